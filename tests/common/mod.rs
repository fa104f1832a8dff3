//! Helpers shared by the integration tests.
#![allow(dead_code)]

use bnlab::nn::{Ctx, Layer, Mode};
use std::path::{Path, PathBuf};

/// `../shared` next to the project (or `$BNLAB_SHARED_DIR`), if present. Every path into
/// ../shared goes through this (or through `$BNLAB_REFERENCE_DIR`, see
/// [`shared_reference_dir`]), so that `BNLAB_SHARED_DIR=/nonexistent
/// BNLAB_REFERENCE_DIR=/nonexistent cargo test --release` runs the suite as a fresh clone would.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("BNLAB_SHARED_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    dir.is_dir().then_some(dir)
}

/// The PyTorch reference cases of ../shared (`$BNLAB_REFERENCE_DIR`, default
/// `../shared/reference`), if present: the larger sets, in addition to the committed ones.
pub fn shared_reference_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("BNLAB_REFERENCE_DIR") {
        Some(d) => PathBuf::from(d),
        None => shared_dir()?.join("reference"),
    };
    dir.is_dir().then_some(dir)
}

/// The PyTorch reference cases the project carries (made by tests/data/make_reference.py, in
/// the layout of ../shared/reference): always present.
pub fn committed_reference_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/reference")
}

/// True when `dir` holds the four files of the MNIST layout, each plain or gzipped.
pub fn holds_idx_set(dir: &Path) -> bool {
    bnlab::data::MNIST_FILES
        .iter()
        .all(|n| dir.join(n).is_file() || dir.join(format!("{n}.gz")).is_file())
}

/// The first of `$BNLAB_DATA/NAME` and `./data/NAME` (where the command line looks, and
/// downloads to) that holds the four IDX files.
fn user_data_dir(name: &str) -> Option<PathBuf> {
    let mut places = Vec::new();
    if let Some(base) = std::env::var_os("BNLAB_DATA").filter(|v| !v.is_empty()) {
        places.push(PathBuf::from(base).join(name));
    }
    places.push(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("data")
            .join(name),
    );
    places.into_iter().find(|d| holds_idx_set(d))
}

/// MNIST where users put it: `$BNLAB_DATA/mnist`, `./data/mnist`, then
/// `../shared/datasets/mnist`; the first that holds the four IDX files.
pub fn mnist_dir() -> Option<PathBuf> {
    user_data_dir("mnist").or_else(|| {
        let d = shared_dir()?.join("datasets/mnist");
        holds_idx_set(&d).then_some(d)
    })
}

/// Writes a small data set in MNIST's layout (28x28 grey images of noise, labels 0..9, plain
/// IDX files) into `dir`, for tests of the command line that need data but not MNIST's.
pub fn synthetic_mnist(dir: &Path, n_train: usize, n_test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = Lcg(0x5eed_1234_abcd_0001);
    let mut bytes = |n: usize, modulo: f64| -> Vec<u8> {
        (0..n)
            .map(|_| ((rng.next() + 1.0) / 2.0 * modulo) as u8)
            .collect()
    };
    let [ti, tl, vi, vl] = bnlab::data::MNIST_FILES;
    let write = |name: &str, dims: &[usize], data: &[u8]| {
        bnlab::data::write_idx(&dir.join(name), dims, data, false).unwrap()
    };
    write(ti, &[n_train, 28, 28], &bytes(n_train * 784, 256.0));
    write(tl, &[n_train], &bytes(n_train, 10.0));
    write(vi, &[n_test, 28, 28], &bytes(n_test * 784, 256.0));
    write(vl, &[n_test], &bytes(n_test, 10.0));
}

/// Fashion-MNIST: `$BNLAB_FASHION_DIR` when set (and then only there), else
/// `$BNLAB_DATA/fashion-mnist`, `./data/fashion-mnist`, then the Debian package's
/// /usr/share/datasets/fashion-mnist (`apt-get install dataset-fashion-mnist`).
pub fn fashion_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("BNLAB_FASHION_DIR") {
        let d = PathBuf::from(d);
        return holds_idx_set(&d).then_some(d);
    }
    user_data_dir("fashion-mnist").or_else(|| {
        let d = PathBuf::from(bnlab::data::FASHION_SYSTEM_DIR);
        holds_idx_set(&d).then_some(d)
    })
}

/// True when `BNLAB_REQUIRE_DATA=1`: `.ci/run` sets it when ../shared and Fashion-MNIST are
/// present, and then a test that would skip for missing data fails instead.
pub fn require_data() -> bool {
    std::env::var_os("BNLAB_REQUIRE_DATA").is_some_and(|v| v == "1")
}

/// Reports that a test, or part of one, did not run because data is missing: fails under
/// `BNLAB_REQUIRE_DATA=1`, else prints `SKIPPED: <test>: <what>`.
pub fn skip(what: &str) {
    assert!(!require_data(), "BNLAB_REQUIRE_DATA=1 but {what}");
    skip_optional(what);
}

/// As [`skip`], for something CI does not promise (onnxruntime, which `.ci/run` installs when
/// PyPI answers): never fails. The line goes to the process's stdout directly, past the test
/// harness's capture, so that `cargo test` shows it without `--nocapture` (a `println!` of a
/// passing test is swallowed) and `cargo test --release 2>&1 | grep SKIPPED:` lists them all.
pub fn skip_optional(what: &str) {
    use std::io::Write;
    let test = std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(|n| format!("{n}: "))
        .unwrap_or_default();
    // After a line break: with one test thread the harness has written "test name ... " and
    // waits for the result on the same line.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "\nSKIPPED: {test}{what}");
    let _ = out.flush();
}

/// MNIST's directory, or `None` after reporting the skip (see [`mnist_dir`]).
pub fn mnist_or_skip() -> Option<PathBuf> {
    let d = mnist_dir();
    if d.is_none() {
        skip("MNIST not present ($BNLAB_DATA/mnist, ./data/mnist or ../shared/datasets/mnist)");
    }
    d
}

/// Fashion-MNIST's directory, or `None` after reporting the skip (see [`fashion_dir`]).
pub fn fashion_or_skip() -> Option<PathBuf> {
    let d = fashion_dir();
    if d.is_none() {
        skip("Fashion-MNIST not present (apt-get install dataset-fashion-mnist)");
    }
    d
}

/// `$BNLAB_ONNX_PYTHON` (a Python with onnxruntime and numpy), or `None` after reporting the
/// skip; `.ci/run` sets it when it could install onnxruntime.
pub fn onnx_python_or_skip() -> Option<String> {
    let p = std::env::var_os("BNLAB_ONNX_PYTHON").map(|p| p.to_string_lossy().into_owned());
    if p.is_none() {
        skip_optional("BNLAB_ONNX_PYTHON not set; onnxruntime check");
    }
    p
}

/// Deterministic pseudo-random numbers in [-1, 1) (xorshift), so tests need no RNG crate.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub fn vec_f32(&mut self, n: usize, scale: f64, offset: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (offset + scale * self.next()) as f32)
            .collect()
    }
}

pub fn ctx(mode: Mode) -> Ctx {
    Ctx { mode, threads: 1 }
}

// The finite-difference harness shared by tests/gradients.rs and tests/conv_layers.rs.

/// sum_i w_i y_i in f64 for a fresh layer from `make`, after `tweak` perturbs it.
pub fn loss_of(
    make: &dyn Fn() -> Box<dyn Layer>,
    tweak: &dyn Fn(&mut dyn Layer),
    x: &[f32],
    n: usize,
    mode: Mode,
    w: &[f64],
) -> f64 {
    let mut layer = make();
    tweak(layer.as_mut());
    layer.reserve(n);
    let mut y = vec![0f32; n * layer.out_size()];
    layer.forward(ctx(mode), x, &mut y, n).unwrap();
    y.iter().zip(w).map(|(&a, &b)| a as f64 * b).sum()
}

pub fn nudge_param(layer: &mut dyn Layer, which: usize, elem: usize, delta: f32) {
    let mut k = 0;
    layer.for_each_param(&mut |v, _| {
        if k == which {
            v[elem] += delta;
        }
        k += 1;
    });
}

/// Compare the analytic dx and parameter gradients of the layer made by `make` against central
/// differences with step `h`. Returns the number of parameter tensors checked.
pub fn check(
    make: &dyn Fn() -> Box<dyn Layer>,
    x: Vec<f32>,
    n: usize,
    mode: Mode,
    h: f32,
    tol: f64,
) -> usize {
    let mut rng = Lcg(0x1234_5678);
    let mut layer = make();
    layer.reserve(n);
    assert_eq!(x.len(), n * layer.in_size());
    let out = n * layer.out_size();
    let w: Vec<f64> = (0..out).map(|_| rng.next()).collect();
    let mut y = vec![0f32; out];
    layer.forward(ctx(mode), &x, &mut y, n).unwrap();
    let dy: Vec<f32> = w.iter().map(|&v| v as f32).collect();
    // Poisoned: backward must overwrite every element of dx.
    let mut dx = vec![f32::NAN; x.len()];
    layer.backward(ctx(mode), &x, &y, &dy, Some(&mut dx), n);
    let mut grads: Vec<Vec<f32>> = Vec::new();
    layer.for_each_param(&mut |_, g| grads.push(g.to_vec()));
    let close = |num: f64, ana: f64, what: &str| {
        assert!(
            (num - ana).abs() <= tol * (1.0 + ana.abs()),
            "{}: {what}: finite difference {num:.6e}, backward {ana:.6e}",
            layer_name(make)
        );
    };
    let none = |_: &mut dyn Layer| {};
    for j in (0..x.len()).step_by((x.len() / 60).max(1)) {
        let mut xp = x.clone();
        xp[j] += h;
        let mut xm = x.clone();
        xm[j] -= h;
        let num = (loss_of(make, &none, &xp, n, mode, &w) - loss_of(make, &none, &xm, n, mode, &w))
            / (xp[j] as f64 - xm[j] as f64);
        close(num, dx[j] as f64, &format!("dx[{j}]"));
    }
    for (p, g) in grads.iter().enumerate() {
        for e in (0..g.len()).step_by((g.len() / 25).max(1)) {
            let plus = |l: &mut dyn Layer| nudge_param(l, p, e, h);
            let minus = |l: &mut dyn Layer| nudge_param(l, p, e, -h);
            let num = (loss_of(make, &plus, &x, n, mode, &w)
                - loss_of(make, &minus, &x, n, mode, &w))
                / (2.0 * h as f64);
            close(num, g[e] as f64, &format!("param {p}[{e}]"));
        }
    }
    grads.len()
}

pub fn layer_name(make: &dyn Fn() -> Box<dyn Layer>) -> String {
    make().describe().replace('\n', " ")
}

/// A `.npy` member (format 1.0, header padded to 64 bytes as NumPy does).
pub fn npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    npy_with(descr, shape, false, data)
}

pub fn npy_with(descr: &str, shape: &[usize], fortran: bool, data: &[u8]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let order = if fortran { "True" } else { "False" };
    let mut header =
        format!("{{'descr': '{descr}', 'fortran_order': {order}, 'shape': {shape}, }}");
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.push_str(&" ".repeat(pad));
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

pub fn zip_of(members: &[(&str, Vec<u8>)], deflate: bool) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    for (name, b) in members {
        w.start_file(*name, opts).unwrap();
        std::io::Write::write_all(&mut w, b).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// Runs the `bnlab` binary with `args`, without the user's data and mirror settings.
pub fn bnlab(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args)
        .env_remove("BNLAB_DATA")
        .env_remove("BNLAB_MNIST_MIRROR")
        .output()
        .expect("bnlab runs")
}

/// Runs `bnlab args`, which must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let o = bnlab(args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `bnlab args` fails, without a panic, with a message containing every one of `needles`.
pub fn fails_with(args: &[&str], needles: &[&str]) {
    let o = bnlab(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: expected '{n}' in: {err}");
    }
}

/// Every tensor of a checkpoint as bit patterns (f32 and f64 bits, i64 values), with its name:
/// for comparing checkpoints bit for bit.
pub fn checkpoint_bits(p: &Path) -> Vec<(String, Vec<u64>)> {
    use bnlab::checkpoint::{Loaded, TensorFile};
    let f = TensorFile::read(p).unwrap();
    f.tensors
        .iter()
        .map(|(k, (_, v))| {
            let bits = match v {
                Loaded::F32(x) => x.iter().map(|v| v.to_bits() as u64).collect(),
                Loaded::F64(x) => x.iter().map(|v| v.to_bits()).collect(),
                Loaded::I64(x) => x.iter().map(|&v| v as u64).collect(),
            };
            (k.clone(), bits)
        })
        .collect()
}
