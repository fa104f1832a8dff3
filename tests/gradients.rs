//! Finite-difference checks of every layer's backward pass, and the paper's identities.
//!
//! Two levels: the f64 twins in `kernels::*::reference` (the paper's unfused BN backward
//! equations) are checked by central differences in f64 to 1e-6; the f32 layers are checked by
//! central differences with the loss accumulated in f64 (tolerance set by f32 rounding), and
//! against the f64 twins directly.

mod common;

use bnlab::kernels::activation::softmax_cross_entropy;
use bnlab::kernels::batch_norm::{reference, Dims};
use bnlab::nn::{BatchNorm, Dropout, InferenceStats, Layer, Linear, Mode, Relu, Sigmoid};
use common::{check, ctx, Lcg};

fn linear(i: usize, o: usize, bias: bool, sparse: bool) -> Box<dyn Layer> {
    let mut rng = Lcg(99);
    let mut l = Linear::new(i, o, bias);
    l.set_weight(&rng.vec_f32(i * o, 0.5, 0.0));
    if let Some(b) = &mut l.bias {
        b.copy_from_slice(&rng.vec_f32(o, 0.5, 0.0));
    }
    l.sparse_input = sparse;
    Box::new(l)
}

#[test]
fn linear_dense_with_and_without_bias() {
    let x = Lcg(1).vec_f32(6 * 9, 1.0, 0.0);
    check(
        &|| linear(9, 5, true, false),
        x.clone(),
        6,
        Mode::Train,
        1e-2,
        2e-3,
    );
    check(
        &|| linear(9, 5, false, false),
        x,
        6,
        Mode::Train,
        1e-2,
        2e-3,
    );
}

#[test]
fn linear_sparse_input_path() {
    // Mostly zeros, as raw pixels: the layer takes its sparse path (checked: same result as dense).
    let mut rng = Lcg(2);
    let x: Vec<f32> = (0..8 * 40)
        .map(|_| {
            let v = rng.next();
            if v > 0.6 {
                v as f32
            } else {
                0.0
            }
        })
        .collect();
    check(
        &|| linear(40, 37, true, true),
        x.clone(),
        8,
        Mode::Train,
        1e-2,
        2e-3,
    );
    let (mut a, mut b) = (linear(40, 37, true, true), linear(40, 37, true, false));
    a.reserve(8);
    b.reserve(8);
    let (mut ya, mut yb) = (vec![0f32; 8 * 37], vec![0f32; 8 * 37]);
    a.forward(ctx(Mode::Train), &x, &mut ya, 8).unwrap();
    b.forward(ctx(Mode::Train), &x, &mut yb, 8).unwrap();
    for (p, q) in ya.iter().zip(&yb) {
        assert!(
            (p - q).abs() <= 1e-5 * (1.0 + q.abs()),
            "sparse {p} vs dense {q}"
        );
    }
}

fn bn(c: usize, s: usize, affine: bool) -> Box<dyn Layer> {
    let mut rng = Lcg(7);
    let mut l = BatchNorm::new(c, s, 1e-5, affine);
    if affine {
        l.gamma = Some(rng.vec_f32(c, 0.5, 1.0));
        l.beta = Some(rng.vec_f32(c, 0.5, 0.0));
    }
    l.running_mean = rng.vec_f32(c, 0.3, 0.0);
    l.running_var = rng.vec_f32(c, 0.3, 1.0);
    Box::new(l)
}

#[test]
fn batch_norm_nc_train_and_eval() {
    let x = Lcg(3).vec_f32(10 * 6, 2.0, 0.5);
    check(&|| bn(6, 1, true), x.clone(), 10, Mode::Train, 1e-2, 5e-3);
    check(&|| bn(6, 1, false), x.clone(), 10, Mode::Train, 1e-2, 5e-3);
    check(&|| bn(6, 1, true), x, 10, Mode::Eval, 1e-2, 2e-3);
}

#[test]
fn batch_norm_nchw_train_and_eval() {
    let x = Lcg(4).vec_f32(4 * 3 * 5, 2.0, -0.5);
    check(&|| bn(3, 5, true), x.clone(), 4, Mode::Train, 1e-2, 5e-3);
    check(&|| bn(3, 5, false), x.clone(), 4, Mode::Train, 1e-2, 5e-3);
    check(&|| bn(3, 5, true), x, 4, Mode::Eval, 1e-2, 2e-3);
}

#[test]
fn sigmoid_relu_dropout() {
    let x = Lcg(5).vec_f32(5 * 8, 3.0, 0.0);
    check(
        &|| Box::new(Sigmoid::new(8)),
        x.clone(),
        5,
        Mode::Train,
        1e-2,
        2e-3,
    );
    // ReLU: keep inputs away from the kink at 0, where the derivative jumps.
    let xr: Vec<f32> = x
        .iter()
        .map(|&v| if v.abs() < 0.1 { v + 0.3 } else { v })
        .collect();
    check(&|| Box::new(Relu::new(8)), xr, 5, Mode::Train, 1e-2, 2e-3);
    // A fresh layer with the same seed draws the same mask, so the function is fixed.
    check(
        &|| Box::new(Dropout::new(8, 0.4, 11)),
        x.clone(),
        5,
        Mode::Train,
        1e-2,
        2e-3,
    );
    check(
        &|| Box::new(Dropout::new(8, 0.4, 11)),
        x,
        5,
        Mode::Eval,
        1e-2,
        2e-3,
    );
}

#[test]
fn dropout_drops_about_p_and_rescales() {
    let mut d = Dropout::new(1000, 0.4, 3);
    d.reserve(10);
    let x = vec![1f32; 10_000];
    let mut y = vec![0f32; 10_000];
    d.forward(ctx(Mode::Train), &x, &mut y, 10).unwrap();
    let zeros = y.iter().filter(|&&v| v == 0.0).count();
    assert!((3700..4300).contains(&zeros), "{zeros} dropped of 10000");
    assert!(y.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.6).abs() < 1e-6));
}

#[test]
fn softmax_cross_entropy_gradient() {
    let (n, k) = (4, 6);
    let logits = Lcg(8).vec_f32(n * k, 4.0, 0.0);
    let labels = [0usize, 5, 2, 2];
    let mut d = vec![0f32; n * k];
    let loss = softmax_cross_entropy(&logits, &labels, n, k, Some(&mut d));
    assert!(loss > 0.0 && loss.is_finite());
    let h = 1e-2f32;
    for j in 0..n * k {
        let (mut p, mut m) = (logits.clone(), logits.clone());
        p[j] += h;
        m[j] -= h;
        let num = (softmax_cross_entropy(&p, &labels, n, k, None)
            - softmax_cross_entropy(&m, &labels, n, k, None))
            / (p[j] as f64 - m[j] as f64);
        assert!(
            (num - d[j] as f64).abs() < 1e-4,
            "dlogits[{j}]: {num} vs {}",
            d[j]
        );
    }
    // Stable for huge logits.
    let big = vec![1e30f32, -1e30, 0.0, 3e29, 1.0, 2.0];
    let l = softmax_cross_entropy(&big, &[1], 1, 6, None);
    assert!(l.is_finite() && l > 1e29);
}

/// The paper's backward equations (f64 twin) against central differences in f64.
#[test]
fn reference_batch_norm_backward_matches_f64_finite_differences() {
    for &(n, c, s) in &[(7usize, 3usize, 1usize), (3, 2, 6)] {
        let d = Dims { n, c, s };
        let mut rng = Lcg(21);
        let x: Vec<f64> = (0..d.len()).map(|_| 1.5 * rng.next() + 0.2).collect();
        let dy: Vec<f64> = (0..d.len()).map(|_| rng.next()).collect();
        let gamma: Vec<f64> = (0..c).map(|_| 1.0 + 0.5 * rng.next()).collect();
        let beta: Vec<f64> = (0..c).map(|_| rng.next()).collect();
        let eps = 1e-5;
        let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
            let f = reference::forward_train(x, d, g, b, eps);
            f.y.iter().zip(&dy).map(|(a, b)| a * b).sum()
        };
        let (dx, dgamma, dbeta) = reference::backward_train(&x, &dy, d, &gamma, eps);
        let h = 1e-6;
        for j in 0..d.len() {
            let (mut p, mut m) = (x.clone(), x.clone());
            p[j] += h;
            m[j] -= h;
            let num = (loss(&p, &gamma, &beta) - loss(&m, &gamma, &beta)) / (2.0 * h);
            assert!((num - dx[j]).abs() < 1e-6, "dx[{j}] {num} vs {}", dx[j]);
        }
        for ch in 0..c {
            let (mut p, mut m) = (gamma.clone(), gamma.clone());
            p[ch] += h;
            m[ch] -= h;
            let num = (loss(&x, &p, &beta) - loss(&x, &m, &beta)) / (2.0 * h);
            assert!((num - dgamma[ch]).abs() < 1e-6);
            let (mut p, mut m) = (beta.clone(), beta.clone());
            p[ch] += h;
            m[ch] -= h;
            let num = (loss(&x, &gamma, &p) - loss(&x, &gamma, &m)) / (2.0 * h);
            assert!((num - dbeta[ch]).abs() < 1e-6);
        }
    }
}

/// Forward and the fused backward of the f32 layer against the f64 twin, in both layouts,
/// including a mean far larger than the spread (1e4 vs 1e-2), where E[x^2] - E[x]^2 in f32
/// returns garbage.
#[test]
fn fused_batch_norm_matches_the_paper_equations() {
    for &(n, c, s, offset, spread) in &[
        (60usize, 5usize, 1usize, 0.3f64, 2.0f64),
        (8, 3, 49, -1.0, 0.5),
        (64, 4, 1, 1e4, 1e-2),
        (16, 2, 36, 1e4, 1e-2),
    ] {
        let d = Dims { n, c, s };
        let mut rng = Lcg(31);
        let x = rng.vec_f32(d.len(), spread, offset);
        let dy = rng.vec_f32(d.len(), 1.0, 0.0);
        let gamma = rng.vec_f32(c, 0.5, 1.0);
        let beta = rng.vec_f32(c, 0.5, 0.0);
        let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let dy64: Vec<f64> = dy.iter().map(|&v| v as f64).collect();
        let g64: Vec<f64> = gamma.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = beta.iter().map(|&v| v as f64).collect();
        let want = reference::forward_train(&x64, d, &g64, &b64, 1e-5);
        let (wdx, wdg, wdb) = reference::backward_train(&x64, &dy64, d, &g64, 1e-5);

        let mut layer = BatchNorm::new(c, s, 1e-5, true);
        layer.gamma = Some(gamma.clone());
        layer.beta = Some(beta.clone());
        layer.reserve(n);
        let mut y = vec![0f32; d.len()];
        layer.forward(ctx(Mode::Train), &x, &mut y, n).unwrap();
        let mut dx = vec![0f32; d.len()];
        layer.backward(ctx(Mode::Train), &x, &y, &dy, Some(&mut dx), n);
        let mut grads = Vec::new();
        layer.for_each_param(&mut |_, g| grads.push(g.to_vec()));
        let err = |got: &[f32], want: &[f64]| {
            let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
            got.iter()
                .zip(want)
                .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
                / scale
        };
        let case = format!("n={n} c={c} s={s} mean={offset} std~{spread}");
        assert!(
            err(&y, &want.y) < 1e-5,
            "{case}: y error {}",
            err(&y, &want.y)
        );
        assert!(err(&dx, &wdx) < 1e-5, "{case}: dx error {}", err(&dx, &wdx));
        assert!(err(&grads[0], &wdg) < 1e-5, "{case}: dgamma");
        assert!(err(&grads[1], &wdb) < 1e-5, "{case}: dbeta");
        let (bm, bv) = layer.batch_stats();
        for ch in 0..c {
            assert!((bv[ch] as f64 - want.var[ch]).abs() <= 1e-5 * want.var[ch] + 1e-12);
            assert!((bm[ch] as f64 - want.mean[ch]).abs() <= 1e-6 * want.mean[ch].abs() + 1e-9);
        }
        if offset == 1e4 {
            // The test can fail: the textbook one-pass formula in f32 is far off here.
            let m = (n * s) as f32;
            let (mut s1, mut s2) = (0f32, 0f32);
            for i in 0..n {
                for p in 0..s {
                    let v = x[i * c * s + p];
                    s1 += v;
                    s2 += v * v;
                }
            }
            let naive = s2 / m - (s1 / m) * (s1 / m);
            assert!(
                (naive as f64 - want.var[0]).abs() > 10.0 * want.var[0],
                "naive f32 variance unexpectedly accurate"
            );
        }
    }
}

/// Algorithm 1's normalized values have mean 0 and variance 1 over the mini-batch.
#[test]
fn normalized_output_has_zero_mean_unit_variance() {
    for &(n, c, s) in &[(60usize, 10usize, 1usize), (4, 3, 25)] {
        let x = Lcg(41).vec_f32(n * c * s, 3.0, 5.0);
        let mut layer = BatchNorm::new(c, s, 1e-5, false);
        layer.reserve(n);
        let mut y = vec![0f32; x.len()];
        layer.forward(ctx(Mode::Train), &x, &mut y, n).unwrap();
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|i| (0..s).map(move |p| (i * c + ch) * s + p))
                .map(|k| y[k] as f64)
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|a| (a - m).powi(2)).sum::<f64>() / vals.len() as f64;
            assert!(m.abs() < 1e-6, "mean {m}");
            assert!((v - 1.0).abs() < 1e-4, "variance {v}");
        }
    }
}

/// Section 3.3: BN(aWu) = BN(Wu), and the gradient with respect to aW is 1/a times that with
/// respect to W. The identities are exact for eps = 0 (eps breaks the scale invariance slightly
/// when a shrinks the variance towards it), so the layer here has eps = 0.
#[test]
fn scale_invariance_of_batch_normalized_layers() {
    let (n, i, o) = (32, 12, 7);
    let u = Lcg(51).vec_f32(n * i, 1.0, 0.2);
    let dy = Lcg(52).vec_f32(n * o, 1.0, 0.0);
    let w = Lcg(53).vec_f32(i * o, 0.3, 0.0);
    let run = |a: f32| {
        let mut lin = Linear::new(i, o, false);
        let scaled: Vec<f32> = w.iter().map(|&v| v * a).collect();
        lin.set_weight(&scaled);
        let mut norm = BatchNorm::new(o, 1, 0.0, true);
        lin.reserve(n);
        norm.reserve(n);
        let (mut h, mut y) = (vec![0f32; n * o], vec![0f32; n * o]);
        lin.forward(ctx(Mode::Train), &u, &mut h, n).unwrap();
        norm.forward(ctx(Mode::Train), &h, &mut y, n).unwrap();
        let mut dh = vec![0f32; n * o];
        norm.backward(ctx(Mode::Train), &h, &y, &dy, Some(&mut dh), n);
        let mut du = vec![0f32; n * i];
        lin.backward(ctx(Mode::Train), &u, &h, &dh, Some(&mut du), n);
        let mut gw = Vec::new();
        lin.for_each_param(&mut |_, g| gw.extend_from_slice(g));
        (y, du, gw)
    };
    let (y1, du1, gw1) = run(1.0);
    for a in [0.1f32, 7.5] {
        let (ya, dua, gwa) = run(a);
        for (p, q) in ya.iter().zip(&y1) {
            assert!((p - q).abs() < 1e-3, "a={a}: BN(aWu) {p} vs BN(Wu) {q}");
        }
        for (p, q) in dua.iter().zip(&du1) {
            assert!(
                (p - q).abs() < 1e-3 * (1.0 + q.abs()),
                "a={a}: du {p} vs {q}"
            );
        }
        for (p, q) in gwa.iter().zip(&gw1) {
            let want = q / a;
            assert!(
                (p - want).abs() < 1e-3 * (1.0 + want.abs()),
                "a={a}: dW {p} vs {want}"
            );
        }
    }
}

/// Algorithm 2 on fixed batches equals the hand-computed averages, with m/(m-1).
#[test]
fn population_statistics_are_algorithm_2() {
    let (n, c) = (5, 3);
    let batches: Vec<Vec<f32>> = (0..4)
        .map(|b| Lcg(60 + b).vec_f32(n * c, 2.0, 1.0))
        .collect();
    let mut layer = BatchNorm::new(c, 1, 1e-5, true);
    layer.reserve(n);
    layer.begin_population();
    let mut y = vec![0f32; n * c];
    for b in &batches {
        layer.forward(ctx(Mode::Population), b, &mut y, n).unwrap();
    }
    assert_eq!(layer.finish_population(), 4);
    assert_eq!(
        layer.num_batches_tracked, 0,
        "population pass must not touch running stats"
    );
    let pm = layer.population_mean.clone().unwrap();
    let pv = layer.population_var.clone().unwrap();
    for ch in 0..c {
        let (mut sm, mut sv) = (0.0, 0.0);
        for b in &batches {
            let v: Vec<f64> = (0..n).map(|i| b[i * c + ch] as f64).collect();
            let m = v.iter().sum::<f64>() / n as f64;
            sm += m;
            sv += v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / n as f64;
        }
        let want_m = sm / 4.0;
        let want_v = sv / 4.0 * n as f64 / (n as f64 - 1.0);
        assert!((pm[ch] as f64 - want_m).abs() < 1e-6);
        assert!((pv[ch] as f64 - want_v).abs() < 1e-5 * want_v);
    }
    // Inference then uses them: y = gamma (x - E[x]) / sqrt(Var[x] + eps) + beta.
    layer.inference = InferenceStats::Population;
    layer
        .forward(ctx(Mode::Eval), &batches[0], &mut y, n)
        .unwrap();
    let want = (batches[0][1] - pm[1]) / (pv[1] + 1e-5).sqrt();
    assert!((y[1] - want).abs() < 1e-5);
}

#[test]
fn batch_of_one_is_an_error_not_nan() {
    let mut layer = BatchNorm::new(4, 1, 1e-5, true);
    layer.reserve(1);
    let mut y = vec![0f32; 4];
    let e = layer
        .forward(ctx(Mode::Train), &[1.0, 2.0, 3.0, 4.0], &mut y, 1)
        .unwrap_err();
    assert!(e.to_string().contains("at least 2"), "{e}");
    // In inference a single example is fine.
    layer
        .forward(ctx(Mode::Eval), &[1.0, 2.0, 3.0, 4.0], &mut y, 1)
        .unwrap();
    assert!(y.iter().all(|v| v.is_finite()));
}
