//! PyTorch pickle checkpoints through the binaries: hostile files are
//! refused with one line naming the file, leave no output and no temporary
//! file behind (TMPDIR is a test folder, checked empty) and their inputs
//! unchanged; every element type and every view (transposed, sliced,
//! offset) is converted to its own exact values. The fixtures in
//! tests/pickle-fixtures were written by torch.save (fuzz/make_pickle_fixtures.py);
//! the hostile files are written here byte by byte.

mod common;

use common::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/pickle-fixtures")
            .join(name),
    )
    .unwrap()
}

/// A test folder with inputs in `in/` and TMPDIR at `tmp/`.
struct Case {
    dir: tempfile::TempDir,
}

impl Case {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("in")).unwrap();
        std::fs::create_dir(dir.path().join("tmp")).unwrap();
        Case { dir }
    }

    fn input(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.dir.path().join("in").join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_string_lossy().into_owned()
    }

    fn out(&self) -> PathBuf {
        self.dir.path().join("merged")
    }

    fn tmp(&self) -> PathBuf {
        self.dir.path().join("tmp")
    }

    fn merge(&self, base: &str, others: &[&str]) -> Output {
        let out = self.out().to_string_lossy().into_owned();
        let mut args = vec!["--base-model-path", base, "--other-model-paths"];
        args.extend_from_slice(others);
        args.extend_from_slice(&["--output-path", &out, "--quiet", "--lambdas"]);
        args.extend(others.iter().map(|_| "0.5"));
        run_env("ta-merge", &args, &[("TMPDIR", &self.tmp())])
    }

    fn analyze(&self, base: &str, models: &[&str]) -> Output {
        let out = self.out().to_string_lossy().into_owned();
        let mut args = vec!["--base", base, "--models"];
        args.extend_from_slice(models);
        args.extend_from_slice(&["--outdir", &out, "--quiet"]);
        run_env("ta-analyze", &args, &[("TMPDIR", &self.tmp())])
    }

    /// Both tools refuse `bad` (as a fine-tune of a valid pickle base, so a
    /// converted copy exists when it fails) with exit 1 and one line naming
    /// it, and leave nothing behind.
    fn refused(&self, name: &str, bytes: &[u8], needles: &[&str]) {
        let base = self.input("base.pt", &fixture("module.pt"));
        let bad = self.input(name, bytes);
        let before = snapshot(&self.dir.path().join("in"));
        for o in [self.merge(&base, &[&bad]), self.analyze(&base, &[&bad])] {
            assert_eq!(o.status.code(), Some(1), "{name}: {}", stderr(&o));
            let mut all = vec![name];
            all.extend_from_slice(needles);
            assert_one_line_error(&o, &all);
            assert!(!self.out().exists(), "{name}: output left behind");
            assert_eq!(
                entries(&self.tmp()),
                Vec::<String>::new(),
                "{name}: temporary files left"
            );
            assert_eq!(
                snapshot(&self.dir.path().join("in")),
                before,
                "{name}: input changed"
            );
        }
    }
}

/// A `torch.save` zip archive with `data.pkl` and the given storages.
fn archive(pkl: &[u8], storages: &[(&str, &[u8])]) -> Vec<u8> {
    archive_with(pkl, storages, false)
}

/// The same, with zip64 records for every entry if `zip64` (as for files
/// past 4 GiB).
fn archive_with(pkl: &[u8], storages: &[(&str, &[u8])], zip64: bool) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(zip64);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pkl).unwrap();
    zip.start_file("archive/byteorder", options).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, bytes) in storages {
        zip.start_file(format!("archive/data/{key}"), options)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// Pickle opcodes for a state dict of strided views, written by hand.
struct Pkl(Vec<u8>);

impl Pkl {
    /// PROTO 2, an empty dict, MARK.
    fn new() -> Self {
        Pkl(vec![0x80, 2, b'}', b'('])
    }

    fn text(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }

    fn int(&mut self, v: u64) {
        if v < 1 << 31 {
            self.0.push(b'J');
            self.0.extend((v as i32).to_le_bytes());
        } else {
            self.0.extend([0x8a, 8]); // LONG1
            self.0.extend(v.to_le_bytes());
        }
    }

    /// `name: _rebuild_tensor_v2(storage, offset, shape, stride, ...)`.
    #[allow(clippy::too_many_arguments)]
    fn tensor(
        &mut self,
        name: &str,
        class: &str,
        key: &str,
        numel: u64,
        offset: u64,
        shape: &[u64],
        stride: &[u64],
    ) -> &mut Self {
        self.text(name);
        self.0.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        self.0.push(b'(');
        self.text("storage");
        self.0.extend(format!("ctorch\n{class}\n").as_bytes());
        self.text(key);
        self.text("cpu");
        self.int(numel);
        self.0.extend(b"tQ");
        self.int(offset);
        self.0.push(b'(');
        for &d in shape {
            self.int(d);
        }
        self.0.extend(b"t(");
        for &s in stride {
            self.int(s);
        }
        self.0.push(b't');
        self.0.push(0x89);
        self.0.extend(b"ccollections\nOrderedDict\n)RtR");
        self
    }

    /// SETITEMS, STOP.
    fn done(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.0);
        out.extend(b"u.");
        out
    }
}

fn i32s(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Every tensor of a safetensors file: dtype, shape, bytes.
fn read_all(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

fn le<T: Copy, const N: usize>(v: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    v.iter().flat_map(|&x| f(x)).collect()
}

#[test]
fn hostile_pickles_are_refused_cleanly() {
    let mut cases: Vec<(&str, Vec<u8>, Vec<&str>)> = Vec::new();

    // A GLOBAL naming os.system, called on a command: refused by name.
    let system = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00echo\x85R.".to_vec();
    cases.push((
        "system.pt",
        archive(&system, &[]),
        vec!["os.system", "refusing"],
    ));
    // The same through STACK_GLOBAL (protocol 4).
    let mut eval = vec![0x80, 4];
    for s in ["builtins", "eval"] {
        eval.push(0x8c);
        eval.push(s.len() as u8);
        eval.extend(s.as_bytes());
    }
    eval.extend(b"\x93X\x01\x00\x00\x001\x85R.");
    cases.push(("eval.pt", archive(&eval, &[]), vec!["builtins.eval"]));

    // Deep nesting: 100,000 open MARKs, and a million nested 1-tuples
    // (a recursive reader or a recursive drop overflows its stack).
    let mut marks = vec![0x80, 2];
    marks.extend(vec![b'('; 100_000]);
    marks.push(b'.');
    cases.push(("marks.pt", archive(&marks, &[]), vec!["nests deeper"]));
    let mut tuples = b"\x80\x02}X\x01\x00\x00\x00x)".to_vec();
    tuples.extend(vec![0x85; 1_000_000]);
    tuples.extend(b"s.");
    cases.push(("tuples.pt", archive(&tuples, &[]), vec!["holds no tensors"]));

    // Memo abuse: a list that holds itself, and 40 levels of lists of ten
    // copies of the level below (10^40 leaves if anything expanded them).
    let mut laughs = b"\x80\x02]q\x00h\x00a".to_vec();
    for level in 1..=40u8 {
        laughs.push(b'(');
        for _ in 0..10 {
            laughs.extend([b'h', level - 1]);
        }
        laughs.extend([b'l', b'q', level]);
    }
    laughs.extend(b"}X\x01\x00\x00\x00xh\x28s.");
    cases.push(("laughs.pt", archive(&laughs, &[]), vec!["holds no tensors"]));
    // A memo entry read but never stored.
    cases.push((
        "memo.pt",
        archive(b"\x80\x02j\xff\xff\xff\xff.", &[]),
        vec!["memo entry 4294967295"],
    ));

    // A storage declared far larger than its zip entry.
    let huge = Pkl::new()
        .tensor("w", "FloatStorage", "0", 1 << 40, 0, &[2], &[1])
        .done();
    cases.push((
        "huge.pt",
        archive(&huge, &[("0", &[0; 8])]),
        vec![
            "'w'",
            "declares storage 0 of 4398046511104 bytes",
            "holds 8 bytes",
        ],
    ));
    // A view past the end of its storage, and one that repeats elements.
    let past = Pkl::new()
        .tensor("w", "IntStorage", "0", 4, 1, &[2, 2], &[2, 1])
        .done();
    cases.push((
        "past.pt",
        archive(&past, &[("0", &i32s(&[1, 2, 3, 4]))]),
        vec!["'w'", "reaches past the end of its storage (16 bytes)"],
    ));
    let broadcast = Pkl::new()
        .tensor("w", "IntStorage", "0", 1, 0, &[1000, 1000], &[0, 0])
        .done();
    cases.push((
        "broadcast.pt",
        archive(&broadcast, &[("0", &i32s(&[7]))]),
        vec!["'w'", "refusing to expand"],
    ));
    // A storage the archive lacks.
    let missing = Pkl::new()
        .tensor("w", "FloatStorage", "9", 1, 0, &[1], &[1])
        .done();
    cases.push((
        "missing.pt",
        archive(&missing, &[]),
        vec!["storage 9 is missing"],
    ));

    // Truncated downloads, an empty file, a legacy (pre-zip) file.
    let views = fixture("views.pt");
    cases.push((
        "truncated.pt",
        views[..views.len() * 3 / 5].to_vec(),
        vec!["truncated"],
    ));
    cases.push(("empty.pt", Vec::new(), vec!["no zip end-of-directory"]));
    cases.push((
        "legacy.pt",
        b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.".to_vec(),
        vec!["legacy"],
    ));
    // A complex tensor: refused with its name and type.
    cases.push((
        "complex.pt",
        fixture("complex.pt"),
        vec!["tensor 'c'", "ComplexFloatStorage"],
    ));

    for (name, bytes, needles) in &cases {
        Case::new().refused(name, bytes, needles);
    }
}

#[test]
fn every_type_and_view_that_torch_saves_is_converted_exactly() {
    let c = Case::new();
    let views = c.input("views.pt", &fixture("views.pt"));
    // Merging a model with itself returns each value as converted.
    let o = c.merge(&views, &[&views]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(entries(&c.tmp()), Vec::<String>::new());
    let got = read_all(&c.out().join("model.safetensors"));

    let w: Vec<f32> = (0..12).map(|v| v as f32).collect();
    let at = |r: usize, c: usize| w[r * 4 + c];
    let t: Vec<f32> = (0..4).flat_map(|c| (0..3).map(move |r| at(r, c))).collect();
    let f16 = |v: &[f32]| -> Vec<u8> {
        v.iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect()
    };
    let bf16: Vec<u8> = (0..6)
        .flat_map(|v| half::bf16::from_f32(v as f32).to_le_bytes())
        .collect();
    let want: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = vec![
        ("w", Dtype::F32, vec![3, 4], le(&w, f32::to_le_bytes)),
        ("w_t", Dtype::F32, vec![4, 3], le(&t, f32::to_le_bytes)),
        (
            "w_slice",
            Dtype::F32,
            vec![2, 2],
            le(&[5.0f32, 6.0, 9.0, 10.0], f32::to_le_bytes),
        ),
        (
            "w_col",
            Dtype::F32,
            vec![3],
            le(&[2.0f32, 6.0, 10.0], f32::to_le_bytes),
        ),
        ("model.embed_tokens.weight", Dtype::BF16, vec![2, 3], bf16),
        ("f16", Dtype::F16, vec![3], f16(&[0.5, -2.0, 65504.0])),
        (
            "f64",
            Dtype::F64,
            vec![2],
            le(&[1.0f64 / 3.0, -1e300], f64::to_le_bytes),
        ),
        (
            "i64",
            Dtype::I64,
            vec![3],
            le(&[-3i64, 1 << 40, 7], i64::to_le_bytes),
        ),
        ("i32", Dtype::I32, vec![2, 2], i32s(&[-1, 2, 3, -4])),
        (
            "i16",
            Dtype::I16,
            vec![2],
            le(&[-300i16, 300], i16::to_le_bytes),
        ),
        ("i8", Dtype::I8, vec![2], vec![0x80, 0x7f]),
        ("u8", Dtype::U8, vec![3], vec![0, 255, 9]),
        ("mask", Dtype::BOOL, vec![4], vec![1, 0, 1, 1]),
        (
            "u16",
            Dtype::U16,
            vec![2],
            le(&[1u16, 65535], u16::to_le_bytes),
        ),
        ("scalar", Dtype::F32, vec![], 2.5f32.to_le_bytes().to_vec()),
        ("empty", Dtype::F32, vec![0, 3], vec![]),
    ];
    for (name, dtype, shape, bytes) in &want {
        let (d, s, b) = got.get(*name).unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!((d, s), (dtype, shape), "{name}");
        assert_eq!(b, bytes, "{name}");
    }
    // The tied lm_head shares the embedding's storage and view: stored once.
    assert!(!got.contains_key("lm_head.weight"));
    assert_eq!(got.len(), want.len());
}

#[test]
fn module_state_dicts_parameters_and_training_checkpoints_are_read() {
    let c = Case::new();
    let module = c.input("module.pt", &fixture("module.pt"));
    let params = c.input("parameters.pt", &fixture("parameters.pt"));
    let training = c.input("training.pt", &fixture("training.pt"));
    let o = c.merge(&module, &[&params, &training]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_all(&c.out().join("model.safetensors"));
    let weight = le(&[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0], f32::to_le_bytes);
    assert_eq!(got["weight"], (Dtype::F32, vec![2, 3], weight));
    let bias = le(&[-1.0f32, 1.0], f32::to_le_bytes);
    assert_eq!(got["bias"], (Dtype::F32, vec![2], bias));
    assert_eq!(got.len(), 2);
    assert_eq!(entries(&c.tmp()), Vec::<String>::new());
}

#[test]
fn hand_written_views_get_their_own_values() {
    // One int storage of 24 values, seen as itself, as a permuted 3-d view,
    // as an offset slice, as a column and as a transposed square: each must
    // come out with the values its strides select (ints are copied
    // verbatim, not merged).
    let data: Vec<i32> = (0..24).map(|v| v * 10 - 7).collect();
    let pkl = Pkl::new()
        .tensor("all", "IntStorage", "0", 24, 0, &[4, 6], &[6, 1])
        .tensor("perm", "IntStorage", "0", 24, 0, &[3, 2, 4], &[2, 1, 6])
        .tensor("slice", "IntStorage", "0", 24, 7, &[2, 3], &[6, 2])
        .tensor("column", "IntStorage", "0", 24, 5, &[4], &[6])
        // A square block and its transpose: same storage, offset and
        // shape, different strides, so not a tied copy.
        .tensor("square", "IntStorage", "0", 24, 0, &[4, 4], &[6, 1])
        .tensor("square_t", "IntStorage", "0", 24, 0, &[4, 4], &[1, 6])
        .done();
    let c = Case::new();
    let file = c.input("views.pt", &archive(&pkl, &[("0", &i32s(&data))]));
    // The same in a zip64 archive (as torch.save writes files past 4 GiB)
    // is the base, whose int tensors the merge copies verbatim.
    let bytes64 = archive_with(&pkl, &[("0", &i32s(&data))], true);
    let central = bytes64.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
    assert_eq!(
        bytes64[central + 20..central + 28],
        [0xff; 8],
        "no zip64 sizes"
    );
    let file64 = c.input("views64.pt", &bytes64);
    let o = c.merge(&file64, &[&file]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = read_all(&c.out().join("model.safetensors"));
    let pick = |offset: usize, shape: &[usize], stride: &[usize]| -> Vec<u8> {
        let n: usize = shape.iter().product();
        let values: Vec<i32> = (0..n)
            .map(|mut flat| {
                let mut at = offset;
                for (d, s) in shape.iter().zip(stride).rev() {
                    at += (flat % d) * s;
                    flat /= d;
                }
                data[at]
            })
            .collect();
        i32s(&values)
    };
    assert_eq!(got["all"].2, i32s(&data));
    assert_eq!(got["perm"].1, vec![3, 2, 4]);
    assert_eq!(got["perm"].2, pick(0, &[3, 2, 4], &[2, 1, 6]));
    assert_eq!(got["slice"].2, pick(7, &[2, 3], &[6, 2]));
    assert_eq!(got["column"].2, pick(5, &[4], &[6]));
    assert_eq!(got["square"].2, pick(0, &[4, 4], &[6, 1]));
    assert_eq!(got["square_t"].2, pick(0, &[4, 4], &[1, 6]));
    assert_ne!(got["square"].2, got["square_t"].2);
    assert!(got.values().all(|t| t.0 == Dtype::I32));
}

/// A pickle of 50 small tensors (distinct views, one per offset, so none
/// is a tied duplicate): five seconds of conversion with the debug builds'
/// 100 ms delay per tensor.
#[cfg(debug_assertions)]
fn slow_pickle() -> Vec<u8> {
    let mut pkl = Pkl::new();
    for k in 0..50 {
        pkl.tensor(&format!("t{k:02}"), "FloatStorage", "0", 64, k, &[4], &[1]);
    }
    archive(&pkl.done(), &[("0", &[0u8; 256])])
}

/// A merge of `file` with itself, half a second into converting it.
#[cfg(debug_assertions)]
fn converting(c: &Case, file: &str) -> std::process::Child {
    let out = c.out().to_string_lossy().into_owned();
    let child = std::process::Command::new(bin_path("ta-merge"))
        .args(["--base-model-path", file, "--other-model-paths", file])
        .args(["--lambdas", "0.5", "--output-path", &out, "--quiet"])
        .env("TMPDIR", c.tmp())
        .env("TV_TEST_PICKLE_DELAY_MS", "100")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    child
}

// Needs the conversion delay of debug builds (`cargo test` without
// --release).
#[cfg(debug_assertions)]
#[test]
fn interrupts_stop_a_conversion_and_leave_no_temporary_file() {
    use std::time::{Duration, Instant};
    for signals in [1, 2] {
        let c = Case::new();
        let file = c.input("slow.pt", &slow_pickle());
        let before = snapshot(&c.dir.path().join("in"));
        let child = converting(&c, &file);
        let sent = Instant::now();
        for _ in 0..signals {
            let kill = std::process::Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status()
                .unwrap();
            assert!(kill.success());
            std::thread::sleep(Duration::from_millis(20));
        }
        let o = child.wait_with_output().unwrap();
        assert!(
            sent.elapsed() < Duration::from_secs(3),
            "{signals} signal(s): took {:?} to stop",
            sent.elapsed()
        );
        assert_eq!(o.status.code(), Some(130), "{signals}: {}", stderr(&o));
        if signals == 1 {
            assert_eq!(stderr(&o).trim(), "error: interrupted");
        }
        assert!(!c.out().exists());
        assert_eq!(entries(&c.tmp()), Vec::<String>::new(), "{signals}");
        assert_eq!(snapshot(&c.dir.path().join("in")), before);
    }
}

// Needs the conversion delay of debug builds.
#[cfg(debug_assertions)]
#[test]
fn a_pickle_truncated_during_its_conversion_is_an_error_not_a_crash() {
    let c = Case::new();
    let file = c.input("slow.pt", &slow_pickle());
    let child = converting(&c, &file);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&file)
        .unwrap()
        .set_len(0)
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_one_line_error(&o, &["slow.pt", "truncated while being read"]);
    assert!(!c.out().exists());
    assert_eq!(entries(&c.tmp()), Vec::<String>::new());
}
