//! Golden tests against PyTorch: every batch-normalization case file of
//! `tests/data/reference` (the project's own, made by tests/data/make_reference.py; always run)
//! and of `$BNLAB_REFERENCE_DIR` (default `../shared/reference`, the larger set; skipped when
//! absent), made with PyTorch's `torch.nn.functional.batch_norm` (see
//! tests/data/reference/README.md for the format). Expected values are f64 computed from the
//! stored f32 inputs; the measure is max|G - E| / max(1, max|E|) and a correct float32
//! implementation stays at or below 1e-4 on every tensor.

mod common;

use bnlab::checkpoint::TensorFile;
use bnlab::kernels::batch_norm::RunningAverage;
use bnlab::nn::{BatchNorm, Ctx, Layer, Mode, Renorm};
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

/// Runs one case; returns (tensor name, error) for every expected tensor.
fn run_case(path: &std::path::Path) -> Vec<(String, f64)> {
    let f = TensorFile::read(path).unwrap_or_else(|e| panic!("{e}"));
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

/// Runs every case of `dir`, printing each one's worst error; fails on any over the tolerance.
fn run_cases(dir: &Path) {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reference dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    cases.sort();
    assert!(!cases.is_empty(), "no reference cases in {}", dir.display());
    let mut failures = Vec::new();
    for case in &cases {
        let errs = run_case(case);
        let (worst_name, worst) = errs.iter().cloned().fold((String::new(), 0.0f64), |a, b| {
            if b.1 > a.1 || b.1.is_nan() {
                b
            } else {
                a
            }
        });
        let name = case.file_stem().unwrap().to_string_lossy();
        println!(
            "{name}: worst error {worst:.3e} ({worst_name}, {} tensors)",
            errs.len()
        );
        if worst.is_nan() || worst > TOLERANCE {
            failures.push(format!("{name}: {worst_name} error {worst:.3e}"));
        }
    }
    assert!(failures.is_empty(), "cases over {TOLERANCE}: {failures:?}");
}

#[test]
fn committed_reference_cases() {
    run_cases(&common::committed_reference_dir());
}

#[test]
fn shared_reference_cases() {
    match common::shared_reference_dir() {
        Some(dir) => run_cases(&dir),
        None => common::skip(
            "the PyTorch reference cases of ../shared/reference ($BNLAB_REFERENCE_DIR) are not \
             present; the committed ones in tests/data/reference ran",
        ),
    }
}
