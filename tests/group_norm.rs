//! Group normalization and layer normalization (`nn::GroupNorm`, `kernels::group_norm`): the f64
//! twin against finite differences, the float32 layer against the twin (also with a large mean),
//! the defining identities, thread-count independence, batch independence, and PyTorch's
//! `state_dict` names. The PyTorch reference cases run in tests/reference.rs.

mod common;

use bnlab::kernels::group_norm::{f64ref, Dims};
use bnlab::nn::{Ctx, GroupNorm, Layer, Mode, TensorMut};
use common::{ctx, Lcg};

/// max|G - E| / max(1, max|E|), the reference cases' measure.
fn err(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()));
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    worst / scale
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// A layer with the given gamma and beta (affine), run forward and backward in `mode` on
/// `threads` threads: (y, dx, dgamma, dbeta).
#[allow(clippy::type_complexity)]
fn run(
    layer: &mut GroupNorm,
    x: &[f32],
    dy: &[f32],
    n: usize,
    mode: Mode,
    threads: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let c = Ctx { mode, threads };
    let mut y = vec![0f32; x.len()];
    layer.forward(c, x, &mut y, n).unwrap();
    let mut dx = vec![0f32; x.len()];
    layer.backward(c, x, &y, dy, Some(&mut dx), n);
    let dg = layer.grad_gamma().map(<[f32]>::to_vec).unwrap_or_default();
    let db = layer.grad_beta().map(<[f32]>::to_vec).unwrap_or_default();
    (y, dx, dg, db)
}

/// The shapes the tests run: (n, c, s, groups), NC and NCHW, one group (layer norm), several,
/// and one channel per group (instance norm).
const SHAPES: &[(usize, usize, usize, usize)] = &[
    (3, 6, 1, 1),
    (3, 6, 1, 2),
    (3, 6, 1, 6),
    (2, 4, 9, 1),
    (3, 4, 9, 2),
    (2, 4, 9, 4),
    (5, 6, 25, 3),
];

/// The f64 twin's backward (the unfused chain rule) against central differences of its
/// forward, for every shape: dx, dgamma and dbeta of the loss sum(w * y).
#[test]
fn twin_backward_matches_finite_differences() {
    let mut rng = Lcg(0x9e37_79b9_7f4a_7c15);
    for &(n, c, s, groups) in SHAPES {
        let d = Dims { n, c, s, groups };
        let x: Vec<f64> = (0..d.len()).map(|_| 0.5 + 2.0 * rng.next()).collect();
        let w: Vec<f64> = (0..d.len()).map(|_| rng.next()).collect();
        let gamma: Vec<f64> = (0..c).map(|_| 1.0 + 0.5 * rng.next()).collect();
        let beta: Vec<f64> = (0..c).map(|_| rng.next()).collect();
        let eps = 1e-5;
        let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
            let f = f64ref::forward(x, d, g, b, eps);
            f.y.iter().zip(&w).map(|(a, b)| a * b).sum()
        };
        let (dx, dgamma, dbeta) = f64ref::backward(&x, &w, d, &gamma, eps);
        let h = 1e-6;
        let case = format!("n={n} c={c} s={s} G={groups}");
        let central = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
        for j in 0..d.len() {
            let num = central(&|e| {
                let mut v = x.clone();
                v[j] += e;
                loss(&v, &gamma, &beta)
            });
            assert!(
                (num - dx[j]).abs() < 1e-6,
                "{case}: dx[{j}] {num} vs {}",
                dx[j]
            );
        }
        for ch in 0..c {
            let num = central(&|e| {
                let mut v = gamma.clone();
                v[ch] += e;
                loss(&x, &v, &beta)
            });
            assert!((num - dgamma[ch]).abs() < 1e-6, "{case}: dgamma[{ch}]");
            let num = central(&|e| {
                let mut v = beta.clone();
                v[ch] += e;
                loss(&x, &gamma, &v)
            });
            assert!((num - dbeta[ch]).abs() < 1e-6, "{case}: dbeta[{ch}]");
        }
        // Make sure the check had something to compare, except where a group is one value
        // (instance norm on features: xhat = 0 whatever x, so dx = 0).
        if d.group_len() > 1 {
            assert!(dx.iter().any(|v| v.abs() > 1e-3), "{case}: dx all tiny");
        } else {
            assert!(
                dx.iter().all(|v| v.abs() < 1e-9),
                "{case}: dx of one-value groups"
            );
        }
    }
}

/// The float32 layer (closed-form backward) against the f64 twin: every shape, a mean near 0
/// and a mean of 1e4 with a spread of 1e-2 (where E[x^2] - E[x]^2 in f32 is garbage), within
/// 1e-4 by the reference measure (1e-5 at the small mean).
#[test]
fn float32_layer_matches_the_twin_also_at_a_large_mean() {
    let mut rng = Lcg(7);
    for &(n, c, s, groups) in SHAPES {
        for &(offset, spread, tol) in &[(0.3f64, 2.0f64, 1e-5f64), (1e4, 1e-2, 1e-4)] {
            let d = Dims { n, c, s, groups };
            let x = rng.vec_f32(d.len(), spread, offset);
            let dy = rng.vec_f32(d.len(), 1.0, 0.0);
            let gamma = rng.vec_f32(c, 0.5, 1.0);
            let beta = rng.vec_f32(c, 1.0, 0.0);
            let (g64, b64) = (to64(&gamma), to64(&beta));
            let want = f64ref::forward(&to64(&x), d, &g64, &b64, 1e-5);
            let (wdx, wdg, wdb) = f64ref::backward(&to64(&x), &to64(&dy), d, &g64, 1e-5);
            let mut layer = GroupNorm::group(groups, c, s, 1e-5, true).unwrap();
            layer.gamma = Some(gamma);
            layer.beta = Some(beta);
            let (y, dx, dg, db) = run(&mut layer, &x, &dy, n, Mode::Train, 1);
            let case = format!("n={n} c={c} s={s} G={groups} mean={offset} std~{spread}");
            for (name, got, want) in [
                ("y", &y, &want.y),
                ("dx", &dx, &wdx),
                ("dgamma", &dg, &wdg),
                ("dbeta", &db, &wdb),
            ] {
                let e = err(got, want);
                assert!(e <= tol, "{case}: {name} error {e:.3e} over {tol:e}");
            }
            // The mean to f32 precision, the variance through inv_std.
            let (mean, inv_std) = layer.last_stats();
            for k in 0..d.stats_len() {
                let m = want.mean[k];
                assert!(
                    (mean[k] as f64 - m).abs() <= m.abs() * 1e-7 + 1e-9,
                    "{case}"
                );
                let is = 1.0 / (want.var[k] + 1e-5).sqrt();
                assert!((inv_std[k] as f64 - is).abs() <= is * 1e-6, "{case}");
            }
        }
    }
}

/// Per (example, group), with gamma 1 and beta 0, the output has mean 0 and variance 1 (up to
/// eps); scaling the input by a > 0 leaves the output unchanged (up to eps: the inputs' variance
/// is about 3, so `a` down to 0.5 keeps eps's effect under 1e-5); without the affine
/// transform the layer is exactly the gamma 1, beta 0 one.
#[test]
fn normalized_groups_have_mean_zero_variance_one_and_scale_does_not_matter() {
    let mut rng = Lcg(11);
    for &(n, c, s, groups) in SHAPES {
        let d = Dims { n, c, s, groups };
        let x = rng.vec_f32(d.len(), 3.0, 5.0);
        let mut layer = GroupNorm::group(groups, c, s, 1e-5, false).unwrap();
        let mut y = vec![0f32; x.len()];
        layer.forward(ctx(Mode::Train), &x, &mut y, n).unwrap();
        let len = d.group_len();
        for (k, grp) in y.chunks_exact(len).enumerate() {
            let m = grp.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
            let v = grp.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / len as f64;
            assert!(m.abs() < 1e-5, "group {k}: mean {m}");
            // A group of one value normalizes to 0 (variance 0).
            let want = if len == 1 { 0.0 } else { 1.0 };
            assert!((v - want).abs() < 1e-4, "group {k}: variance {v}");
        }
        let mut affine = GroupNorm::group(groups, c, s, 1e-5, true).unwrap();
        let mut ya = vec![0f32; x.len()];
        affine.forward(ctx(Mode::Train), &x, &mut ya, n).unwrap();
        assert_eq!(ya, y, "gamma 1, beta 0 is the plain normalization");
        for a in [0.5f32, 7.0, 300.0] {
            let xs: Vec<f32> = x.iter().map(|&v| v * a).collect();
            let mut ys = vec![0f32; x.len()];
            layer.forward(ctx(Mode::Train), &xs, &mut ys, n).unwrap();
            let e = err(&ys, &to64(&y));
            assert!(e < 1e-4, "scale {a}: GN(a x) differs from GN(x) by {e:.3e}");
        }
    }
}

/// One and two threads give the same bits (forward, dx, dgamma, dbeta), for odd and even
/// batches; and every mode computes the same function (no statistics cross examples).
#[test]
fn threads_and_modes_give_the_same_bits() {
    let mut rng = Lcg(13);
    for &(n, c, s, groups) in &[
        (7usize, 8usize, 16usize, 4usize),
        (6, 12, 1, 1),
        (1, 4, 9, 2),
    ] {
        let x = rng.vec_f32(n * c * s, 1.0, 0.5);
        let dy = rng.vec_f32(n * c * s, 1.0, 0.0);
        let make = || {
            let mut l = GroupNorm::group(groups, c, s, 1e-5, true).unwrap();
            l.gamma = Some((0..c).map(|i| 1.0 + i as f32 / 10.0).collect());
            l.beta = Some((0..c).map(|i| i as f32 / 5.0).collect());
            l
        };
        let one = run(&mut make(), &x, &dy, n, Mode::Train, 1);
        let two = run(&mut make(), &x, &dy, n, Mode::Train, 2);
        assert_eq!(one, two, "n={n} c={c} s={s}: 1 vs 2 threads");
        for mode in [Mode::Eval, Mode::Population] {
            let other = run(&mut make(), &x, &dy, n, mode, 2);
            assert_eq!(one, other, "{mode:?} differs from Train");
        }
    }
}

/// Each example is normalized on its own: example 2 of a batch of 4 gives the bits it gives
/// in a batch of 1, and a batch of 1 trains (where BatchNorm refuses).
#[test]
fn examples_are_independent_and_a_batch_of_one_works() {
    let (c, s) = (6, 4);
    let mut rng = Lcg(17);
    let x = rng.vec_f32(4 * c * s, 1.0, 0.0);
    let dy = rng.vec_f32(4 * c * s, 1.0, 0.0);
    let mut layer = GroupNorm::group(3, c, s, 1e-5, true).unwrap();
    let (y4, dx4, ..) = run(&mut layer, &x, &dy, 4, Mode::Train, 1);
    let one = 2 * c * s..3 * c * s;
    let (y1, dx1, ..) = run(
        &mut layer,
        &x[one.clone()],
        &dy[one.clone()],
        1,
        Mode::Train,
        1,
    );
    assert_eq!(&y4[one.clone()], &y1[..]);
    assert_eq!(&dx4[one], &dx1[..]);
}

/// Checkpoint names as PyTorch's `nn.GroupNorm` / `nn.LayerNorm`: `weight` and `bias` of
/// `[C]`, nothing else; none without the affine transform. Bad geometry is an error.
#[test]
fn state_is_weight_and_bias_and_bad_groups_are_refused() {
    let mut gn = GroupNorm::group(4, 8, 9, 1e-5, true).unwrap();
    let mut names = Vec::new();
    gn.visit_state("3.", &mut |name, shape, t| {
        assert!(matches!(t, TensorMut::F32(_)));
        names.push((name.to_string(), shape.to_vec()));
    });
    assert_eq!(
        names,
        [
            ("3.weight".to_string(), vec![8]),
            ("3.bias".to_string(), vec![8])
        ]
    );
    let mut plain = GroupNorm::layer(8, 1, 1e-5, false).unwrap();
    let mut count = 0;
    plain.visit_state("", &mut |_, _, _| count += 1);
    assert_eq!(count, 0);
    assert_eq!(gn.describe(), "GroupNorm(4, 8, eps=0.00001)");
    assert_eq!(plain.describe(), "LayerNorm(8, eps=0.00001, affine=False)");
    for (g, c) in [(3, 8), (0, 8), (16, 8)] {
        let e = GroupNorm::group(g, c, 1, 1e-5, true)
            .err()
            .expect("refused");
        assert!(e.to_string().contains("groups"), "{e}");
    }
    // Backward without a forward pass: zero gradients, zero dx.
    let mut fresh = GroupNorm::group(2, 4, 1, 1e-5, true).unwrap();
    let mut dx = vec![1f32; 8];
    fresh.backward(
        ctx(Mode::Train),
        &[0.0; 8],
        &[0.0; 8],
        &[1.0; 8],
        Some(&mut dx),
        2,
    );
    assert_eq!(dx, [0.0; 8]);
    assert_eq!(fresh.grad_beta().unwrap(), &[0.0; 4]);
}

// Model files, summary, training, fold and export with GroupNorm and LayerNorm.

use bnlab::checkpoint::{self, TensorFile};
use bnlab::model::{self, ModelSpec, Node};
use bnlab::network::Network;
use common::{fails_with, ok};

/// A small conv net with a GroupNorm, a LayerNorm over feature maps and a LayerNorm over
/// features (PyTorch's `nn.LayerNorm(16)`), and no BatchNorm.
const GN_NET: &str = r#"{
  "name": "gn-small",
  "input": [1, 28, 28],
  "layers": [
    {"type": "Conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1, "bias": false},
    {"type": "GroupNorm", "num_groups": 4, "num_channels": 8, "eps": 1e-5, "affine": true},
    {"type": "ReLU"},
    {"type": "MaxPool2d", "kernel_size": 2},
    {"type": "Conv2d", "out_channels": 6, "kernel_size": 3, "padding": 1},
    {"type": "LayerNorm"},
    {"type": "ReLU"},
    {"type": "GlobalAvgPool"},
    {"type": "Linear", "out_features": 16},
    {"type": "LayerNorm", "normalized_shape": 16},
    {"type": "ReLU"},
    {"type": "Linear", "out_features": 10}
  ]
}"#;

/// Parse and build `layers` in a 1x28x28 model; the error message.
fn build_error(layers: &str) -> String {
    let text = format!(r#"{{"name": "t", "input": [1, 28, 28], "layers": [{layers}]}}"#);
    match ModelSpec::parse(&text, "t.json") {
        Err(e) => e.to_string(),
        Ok(spec) => match model::build(&spec, &[1, 28, 28], 0, false) {
            Ok(_) => panic!("expected an error for {layers}"),
            Err(e) => e.to_string(),
        },
    }
}

#[test]
fn model_files_build_group_and_layer_norm_with_pytorch_names() {
    let spec = ModelSpec::parse(GN_NET, "gn.json").unwrap();
    assert_eq!(
        spec.layers[1].node,
        Node::GroupNorm {
            groups: 4,
            num_channels: Some(8),
            eps: 1e-5,
            affine: true
        }
    );
    assert_eq!(
        spec.layers[9].node,
        Node::LayerNorm {
            normalized_shape: Some(vec![16]),
            eps: 1e-5,
            affine: true
        }
    );
    assert!(!spec.has_batch_norm());
    // Written back and parsed again: the same tree.
    let again = ModelSpec::parse(&spec.to_json().to_string(), "again").unwrap();
    assert_eq!(again, spec);
    let built = model::build(&spec, &[1, 28, 28], 0, false).unwrap();
    let rows: Vec<(String, usize, Vec<usize>)> = built
        .summary
        .iter()
        .filter(|r| r.kind.ends_with("Norm"))
        .map(|r| (r.kind.clone(), r.params, r.output.clone()))
        .collect();
    assert_eq!(
        rows,
        [
            ("GroupNorm".to_string(), 16, vec![8, 28, 28]),
            ("LayerNorm".to_string(), 12, vec![6, 14, 14]),
            ("LayerNorm".to_string(), 32, vec![16]),
        ]
    );
    let mut net = Network::build(&spec, &[1, 28, 28], 0, 4, 1).unwrap();
    assert!(!net.has_batch_norm());
    let mut names = Vec::new();
    net.body
        .visit_state("", &mut |n, s, _| names.push(format!("{n}{s:?}")));
    for want in [
        "1.weight[8]",
        "1.bias[8]",
        "5.weight[6]",
        "5.bias[6]",
        "9.weight[16]",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    assert!(!names.iter().any(|n| n.contains("running")), "{names:?}");
    // A batch of one goes through (no batch statistics).
    let x = Lcg(3).vec_f32(784, 1.0, 0.0);
    let logits = net.forward(&x, 1, Mode::Train).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn bad_group_and_layer_norm_entries_are_errors_naming_their_place() {
    let conv = r#"{"type": "Conv2d", "out_channels": 8, "kernel_size": 3}"#;
    let cases: &[(&str, &[&str])] = &[
        (
            r#"{"type": "GroupNorm", "num_groups": 3}"#,
            &[
                "layers[1] (module '1')",
                "num_groups 3 does not divide the 8 channels",
            ],
        ),
        (
            r#"{"type": "GroupNorm", "num_groups": 2, "num_channels": 6}"#,
            &[
                "layers[1] (module '1')",
                "num_channels is 6 but the input has 8",
            ],
        ),
        (
            r#"{"type": "GroupNorm"}"#,
            &["layers[1] (module '1')", "GroupNorm needs 'num_groups'"],
        ),
        (
            r#"{"type": "GroupNorm", "num_groups": 0}"#,
            &["layers[1]", "'num_groups' must be at least 1"],
        ),
        (
            r#"{"type": "GroupNorm", "num_groups": 2, "momentum": 0.1}"#,
            &["layers[1]", "unknown key 'momentum' for GroupNorm"],
        ),
        (
            r#"{"type": "LayerNorm", "normalized_shape": 8}"#,
            &[
                "layers[1] (module '1')",
                "normalized_shape is [8] but the input is [8, 26, 26]",
            ],
        ),
        (
            r#"{"type": "LayerNorm", "normalized_shape": "x"}"#,
            &["layers[1]", "'normalized_shape' must be a positive integer"],
        ),
        (
            r#"{"type": "LayerNorm", "eps": 0}"#,
            &["layers[1]", "'eps' must be positive"],
        ),
        (
            r#"{"type": "LayerNorm", "affine": false}"#,
            &["layers[1]", "unknown key 'affine' for LayerNorm"],
        ),
    ];
    for (entry, needles) in cases {
        let e = build_error(&format!("{conv}, {entry}"));
        for n in *needles {
            assert!(e.contains(n), "{entry}: expected '{n}' in: {e}");
        }
    }
    // A LayerNorm given the whole shape of maps is fine.
    let text = format!(
        r#"{{"name": "t", "input": [1, 28, 28], "layers": [{conv},
           {{"type": "LayerNorm", "normalized_shape": [8, 26, 26], "elementwise_affine": false}},
           {{"type": "GlobalAvgPool"}}, {{"type": "Linear", "out_features": 2}}]}}"#
    );
    let spec = ModelSpec::parse(&text, "t").unwrap();
    let built = model::build(&spec, &[1, 28, 28], 0, false).unwrap();
    assert_eq!(built.summary[1].params, 0);
}

/// From the command line: summary counts GN/LN parameters, `train --model FILE` trains the GN
/// net end to end on synthetic data (also with a batch of one, which BatchNorm nets refuse),
/// the checkpoint has PyTorch's names and trained gamma values; `fold` and `export` refuse
/// with clear errors.
#[test]
fn a_group_norm_model_file_trains_from_the_command_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::synthetic_mnist(&data, 120, 20);
    let d = data.to_str().unwrap();
    let file = tmp.path().join("gn-small.json");
    std::fs::write(&file, GN_NET).unwrap();
    let m = file.to_str().unwrap();
    let summary = ok(&["summary", "--model", m, "--data", d]);
    assert!(summary.contains("GroupNorm"), "{summary}");
    assert!(summary.contains("LayerNorm"), "{summary}");
    // 72 + 16 + (432 + 6) + 12 + (96 + 16) + 32 + (160 + 10).
    assert!(summary.contains("total parameters: 852"), "{summary}");
    let w = tmp.path().join("w.safetensors");
    let w_s = w.to_str().unwrap();
    for batch in ["8", "1"] {
        ok(&[
            "train",
            "--model",
            m,
            "--data",
            d,
            "--steps",
            "6",
            "--batch-size",
            batch,
            "--lr",
            "0.1",
            "--eval-every",
            "0",
            "--save",
            w_s,
        ]);
    }
    let f = TensorFile::read(&w).unwrap();
    let gamma = f.f32s("1.weight").expect("GroupNorm weight saved");
    assert_eq!(gamma.len(), 8);
    assert!(
        gamma.iter().any(|&g| g != 1.0),
        "gamma did not train: {gamma:?}"
    );
    assert!(f.f32s("9.bias").is_some());
    assert!(!f.tensors.keys().any(|k| k.contains("running")));
    // Loads back into the network.
    let spec = model::resolve(m).unwrap();
    let mut net = Network::build(&spec, &[1, 28, 28], 0, 4, 1).unwrap();
    checkpoint::load(&mut net, &w).unwrap();
    let onnx = tmp.path().join("m.onnx");
    fails_with(
        &[
            "export",
            "--model",
            m,
            "--weights",
            w_s,
            "--out",
            onnx.to_str().unwrap(),
        ],
        &[
            "does not support group or layer normalization",
            "GroupNorm(4, 8",
        ],
    );
    fails_with(
        &[
            "fold",
            "--model",
            m,
            "--weights",
            w_s,
            "--save",
            onnx.to_str().unwrap(),
        ],
        &["no batch normalization to fold"],
    );
}

/// Folding a net with BatchNorm and GroupNorm: each BN goes into the layer before it, the
/// GroupNorm stays (its trained gamma and beta copied) and the folded network computes the
/// same inference function. A BatchNorm after a GroupNorm cannot be folded.
#[test]
fn fold_keeps_group_norm_as_it_is() {
    let text = r#"{"name": "bn-gn", "input": [1, 12, 12], "layers": [
        {"type": "Conv2d", "out_channels": 4, "kernel_size": 3, "bias": false},
        {"type": "BatchNorm2d"},
        {"type": "ReLU"},
        {"type": "GroupNorm", "num_groups": 2},
        {"type": "Conv2d", "out_channels": 4, "kernel_size": 3},
        {"type": "BatchNorm2d"},
        {"type": "Flatten"},
        {"type": "LayerNorm"},
        {"type": "Linear", "out_features": 3}
    ]}"#;
    let spec = ModelSpec::parse(text, "t").unwrap();
    let mut net = Network::build(&spec, &[1, 12, 12], 1, 8, 1).unwrap();
    let mut rng = Lcg(21);
    // Training-like state: BN statistics and every gamma and beta away from their defaults.
    let x = rng.vec_f32(8 * 144, 1.0, 0.5);
    for _ in 0..5 {
        net.forward(&x, 8, Mode::Train).unwrap();
    }
    net.body.for_each_param(&mut |p, _| {
        for v in p.iter_mut() {
            *v += 0.3 * rng.next() as f32;
        }
    });
    let folded_spec = bnlab::fold::plain_spec(&spec).unwrap();
    assert!(!folded_spec.has_batch_norm());
    let kinds: Vec<bool> = folded_spec
        .layers
        .iter()
        .map(|c| matches!(c.node, Node::GroupNorm { .. } | Node::LayerNorm { .. }))
        .collect();
    assert_eq!(kinds.iter().filter(|&&k| k).count(), 2, "{folded_spec:?}");
    let mut folded = bnlab::fold::fold(&mut net).unwrap();
    let a = net.forward(&x, 8, Mode::Eval).unwrap().to_vec();
    let b = folded.forward(&x, 8, Mode::Eval).unwrap().to_vec();
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(
        worst < 1e-4,
        "folded logits differ by {worst}: {a:?} vs {b:?}"
    );

    let bad = r#"{"name": "gn-bn", "input": [4], "layers": [
        {"type": "Linear", "out_features": 4},
        {"type": "LayerNorm"},
        {"type": "BatchNorm1d"},
        {"type": "Linear", "out_features": 2}
    ]}"#;
    let e = bnlab::fold::plain_spec(&ModelSpec::parse(bad, "t").unwrap())
        .expect_err("refused")
        .to_string();
    assert!(e.contains("cannot fold the BatchNorm '2'"), "{e}");
}
