//! Golden tests against PyTorch: every normalization-layer case file under
//! `tests/data/reference` (the project's own; always run) and under `$BNLAB_REFERENCE_DIR`
//! (default `../shared/reference`, the larger set; skipped when absent), subfolders included
//! (`norms/`), dispatched on the metadata `op`: `batch_norm` (PyTorch's
//! `torch.nn.functional.batch_norm`), `layer_norm` and `group_norm` (see
//! tests/data/reference/README.md for the format). Any other op is listed as a visible
//! `SKIPPED <file>: op <op> not handled yet` line; files without an `op` (the whole-network
//! checkpoints of `grad/` and `replay/`, which tests/grad_reference.rs and tests/replay.rs read)
//! are not layer cases and are counted, not run. Expected values are f64 computed from the
//! stored f32 inputs; the measure is max|G - E| / max(1, max|E|) and a correct float32
//! implementation stays at or below 1e-4 on every tensor.

mod common;

use bnlab::checkpoint::TensorFile;
use bnlab::kernels::batch_norm::RunningAverage;
use bnlab::nn::{BatchNorm, Ctx, GroupNorm, Layer, Mode, Renorm};
use std::path::{Path, PathBuf};

const TOLERANCE: f64 = 1e-4;

fn err(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (g, e)| m.max((g - e).abs()));
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    worst / scale
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Runs one `batch_norm` case; returns (tensor name, error) for every expected tensor.
fn run_batch_norm(path: &Path, f: &TensorFile) -> Vec<(String, f64)> {
    let meta = |k: &str| f.metadata.get(k).cloned().unwrap_or_default();
    let op = meta("op");
    assert!(
        op == "batch_norm" || op == "batch_renorm",
        "{}: op {op}",
        path.display()
    );
    let mode = meta("mode");
    let eps: f32 = meta("eps").parse().expect("eps");
    let shape = f.shape("x").expect("x").to_vec();
    let (n, c, s) = match shape.len() {
        2 => (shape[0], shape[1], 1),
        4 => (shape[0], shape[1], shape[2] * shape[3]),
        _ => panic!("{}: x has shape {shape:?}", path.display()),
    };
    let layout = meta("layout");
    assert!(
        (layout == "NC") == (shape.len() == 2),
        "layout {layout} vs shape {shape:?}"
    );
    let gamma = f.f32s("gamma");
    let mut bn = BatchNorm::new(c, s, eps, gamma.is_some());
    bn.gamma = gamma;
    if bn.gamma.is_some() {
        bn.beta = Some(f.f32s("beta").unwrap_or(vec![0.0; c]));
    }
    bn.running_average = match meta("momentum").parse::<f32>() {
        Ok(m) => RunningAverage::Exponential { momentum: m },
        Err(_) => RunningAverage::Cumulative,
    };
    if let Some(v) = f.f32s("running_mean_in") {
        bn.running_mean = v;
    }
    if let Some(v) = f.f32s("running_var_in") {
        bn.running_var = v;
    }
    if op == "batch_renorm" {
        let limit = |k: &str| meta(k).parse::<f32>().unwrap_or_else(|_| panic!("{k}"));
        bn.set_renorm(Some(Renorm {
            rmax: limit("rmax"),
            dmax: limit("dmax"),
        }));
    }
    bn.reserve(n);
    let x = f.f32s("x").expect("x");
    let dy = f.f32s("dy").expect("dy");
    let ctx = Ctx {
        mode: if mode == "train" {
            Mode::Train
        } else {
            Mode::Eval
        },
        threads: 1,
    };
    let mut y = vec![0f32; x.len()];
    bn.forward(ctx, &x, &mut y, n).expect("forward");
    let mut dx = vec![0f32; x.len()];
    bn.backward(ctx, &x, &y, &dy, Some(&mut dx), n);
    let mut dgamma = vec![0f32; c];
    let mut dbeta = vec![0f32; c];
    let mut k = 0;
    bn.for_each_param(&mut |_, g| {
        if k == 0 {
            dgamma.copy_from_slice(g)
        } else {
            dbeta.copy_from_slice(g)
        }
        k += 1;
    });
    let (bm, bv) = bn.batch_stats();
    let computed: Vec<(&str, Vec<f64>)> = vec![
        ("y", to64(&y)),
        ("dx", to64(&dx)),
        ("dgamma", to64(&dgamma)),
        ("dbeta", to64(&dbeta)),
        ("running_mean_out", to64(&bn.running_mean)),
        ("running_var_out", to64(&bn.running_var)),
        ("batch_mean", to64(bm)),
        ("batch_var", to64(bv)),
    ];
    let mut out = Vec::new();
    for (name, got) in computed {
        if let Some(want) = f.f64s(name) {
            if (name == "dgamma" || name == "dbeta") && k == 0 {
                continue; // affine switched off: no such gradients
            }
            out.push((name.to_string(), err(&got, &want)));
        }
    }
    assert!(
        out.iter().any(|(n, _)| n == "y") && out.iter().any(|(n, _)| n == "dx"),
        "{}: case has no y or dx",
        path.display()
    );
    out
}

/// Runs one `layer_norm` or `group_norm` case (`groups` from the metadata for group norm, one
/// group for layer norm; `layout` NC or NCHW; the same function in both modes); returns (tensor
/// name, error) for every expected tensor.
fn run_group_norm(path: &Path, f: &TensorFile) -> Vec<(String, f64)> {
    let meta = |k: &str| f.metadata.get(k).cloned().unwrap_or_default();
    let op = meta("op");
    let eps: f32 = meta("eps").parse().expect("eps");
    let shape = f.shape("x").expect("x").to_vec();
    let (n, c, s) = match shape.len() {
        2 => (shape[0], shape[1], 1),
        4 => (shape[0], shape[1], shape[2] * shape[3]),
        _ => panic!("{}: x has shape {shape:?}", path.display()),
    };
    let layout = meta("layout");
    assert!(
        (layout == "NC") == (shape.len() == 2),
        "{}: layout {layout} vs shape {shape:?}",
        path.display()
    );
    let gamma = f.f32s("gamma");
    let affine = gamma.is_some();
    let mut layer = if op == "layer_norm" {
        GroupNorm::layer(c, s, eps, affine)
    } else {
        let groups: usize = meta("groups").parse().expect("groups");
        GroupNorm::group(groups, c, s, eps, affine)
    }
    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if affine {
        layer.gamma = gamma;
        layer.beta = Some(f.f32s("beta").unwrap_or(vec![0.0; c]));
    }
    let x = f.f32s("x").expect("x");
    let dy = f.f32s("dy").expect("dy");
    let ctx = Ctx {
        mode: if meta("mode") == "eval" {
            Mode::Eval
        } else {
            Mode::Train
        },
        threads: 1,
    };
    layer.reserve(n);
    let mut y = vec![0f32; x.len()];
    layer.forward(ctx, &x, &mut y, n).expect("forward");
    let mut dx = vec![0f32; x.len()];
    layer.backward(ctx, &x, &y, &dy, Some(&mut dx), n);
    let mut computed: Vec<(&str, Vec<f64>)> = vec![("y", to64(&y)), ("dx", to64(&dx))];
    if let (Some(dg), Some(db)) = (layer.grad_gamma(), layer.grad_beta()) {
        computed.push(("dgamma", to64(dg)));
        computed.push(("dbeta", to64(db)));
    }
    let mut out = Vec::new();
    for (name, got) in computed {
        if let Some(want) = f.f64s(name) {
            out.push((name.to_string(), err(&got, &want)));
        }
    }
    // Every expected tensor is one this harness compares: nothing silently unchecked.
    for name in f.tensors.keys() {
        let known = ["x", "dy", "gamma", "beta", "y", "dx", "dgamma", "dbeta"];
        assert!(
            known.contains(&name.as_str()),
            "{}: tensor {name} not checked",
            path.display()
        );
    }
    assert!(
        out.iter().any(|(n, _)| n == "y") && out.iter().any(|(n, _)| n == "dx"),
        "{}: case has no y or dx",
        path.display()
    );
    out
}

/// Every `*.safetensors` file under `dir`, subfolders included, sorted.
fn case_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries =
        std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reference dir {}: {e}", dir.display()));
    for p in entries.filter_map(|e| e.ok().map(|e| e.path())) {
        if p.is_dir() {
            case_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "safetensors") {
            out.push(p);
        }
    }
}

/// Runs every case under `dir` (recursively), printing each one's worst error and the
/// tolerance, or a `SKIPPED` line for an op this harness does not handle; fails on any error
/// over the tolerance. Returns the ops of the cases run.
fn run_cases(dir: &Path) -> Vec<String> {
    let mut files = Vec::new();
    case_files(dir, &mut files);
    files.sort();
    let mut failures = Vec::new();
    let mut ran = Vec::new();
    let mut not_cases = 0;
    for case in &files {
        let f = TensorFile::read(case).unwrap_or_else(|e| panic!("{e}"));
        let rel = case.strip_prefix(dir).unwrap_or(case).display().to_string();
        let errs = match f.metadata.get("op").map(String::as_str) {
            None => {
                not_cases += 1;
                continue;
            }
            Some("batch_norm" | "batch_renorm") => run_batch_norm(case, &f),
            Some("layer_norm" | "group_norm") => run_group_norm(case, &f),
            Some(op) => {
                common::skip_optional(&format!("{rel}: op {op} not handled yet"));
                continue;
            }
        };
        ran.push(f.metadata["op"].clone());
        let (worst_name, worst) = errs.iter().cloned().fold((String::new(), 0.0f64), |a, b| {
            if b.1 > a.1 || b.1.is_nan() {
                b
            } else {
                a
            }
        });
        let name = rel.trim_end_matches(".safetensors");
        println!(
            "{name}: worst error {worst:.3e} ({worst_name}, {} tensors; tolerance {TOLERANCE:e})",
            errs.len()
        );
        if worst.is_nan() || worst > TOLERANCE {
            failures.push(format!("{name}: {worst_name} error {worst:.3e}"));
        }
    }
    println!(
        "{}: {} cases run, {not_cases} files without an 'op' (whole-network files) not layer cases",
        dir.display(),
        ran.len()
    );
    assert!(!ran.is_empty(), "no reference cases in {}", dir.display());
    assert!(failures.is_empty(), "cases over {TOLERANCE}: {failures:?}");
    ran
}

#[test]
fn committed_reference_cases() {
    let ran = run_cases(&common::committed_reference_dir());
    // The committed set covers batch norm and the LN/GN cases copied from ../shared (norms/).
    for op in ["batch_norm", "layer_norm", "group_norm"] {
        assert!(ran.iter().any(|o| o == op), "no committed {op} case ran");
    }
}

#[test]
fn shared_reference_cases() {
    match common::shared_reference_dir() {
        Some(dir) => {
            run_cases(&dir);
        }
        None => common::skip(
            "the PyTorch reference cases of ../shared/reference ($BNLAB_REFERENCE_DIR) are not \
             present; the committed ones in tests/data/reference ran",
        ),
    }
}
