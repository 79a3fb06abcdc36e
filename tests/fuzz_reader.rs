//! Fuzzing the checkpoint reader: the committed corpus (tests/fuzz-corpus)
//! and random mutations of its files and of an index must never panic.
//! Whatever opens is also analysed and merged, to exercise odd shapes.

use proptest::prelude::*;
use std::path::Path;
use tv_core::analyze::{analyze, AnalyzeOptions};
use tv_core::device::Device;
use tv_core::family::Family;
use tv_core::merge::{MergeOptions, MergePlan};
use tv_core::progress::Silent;

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus");
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

/// A mutation of a corpus file.
#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, byte: u8 },
    Truncate { to: usize },
    HeaderLength { len: u64 },
    Insert { at: usize, text: String },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Flip { at, byte }),
        any::<usize>().prop_map(|to| Mutation::Truncate { to }),
        prop_oneof![Just(0u64), Just(u64::MAX), 0u64..4096]
            .prop_map(|len| Mutation::HeaderLength { len }),
        (any::<usize>(), "[\\[\\]{}\",:0-9a-zA-Z_ -]{1,12}")
            .prop_map(|(at, text)| Mutation::Insert { at, text }),
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
