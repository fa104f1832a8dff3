//! The batch-norm family inside `BatchNorm`: ghost batch normalization, batch
//! renormalization and frozen BN. Each is checked against an independent computation: the f64
//! twin of Algorithm 1 on every virtual batch, finite differences, plain BN where the method
//! must reduce to it bit for bit, and the formulas of the papers for the running statistics.
//! (The PyTorch cases of batch renormalization run in tests/reference.rs.)

mod common;

use bnlab::kernels::batch_norm::{reference, Dims};
use bnlab::nn::{BatchNorm, Layer, Mode, Renorm, RenormSchedule};
use common::{check, ctx, Lcg};

fn err(got: &[f32], want: &[f64]) -> f64 {
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    got.iter()
        .zip(want)
        .fold(0.0f64, |m, (&g, &w)| m.max((g as f64 - w).abs()))
        / scale
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Forward and backward of one layer in `mode`: (y, dx, dgamma, dbeta).
fn run(
    layer: &mut BatchNorm,
    mode: Mode,
    x: &[f32],
    dy: &[f32],
    n: usize,
) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let mut y = vec![0f32; x.len()];
    layer.forward(ctx(mode), x, &mut y, n).unwrap();
    let mut dx = vec![f32::NAN; x.len()];
    layer.backward(ctx(mode), x, &y, dy, Some(&mut dx), n);
    let mut g = Vec::new();
    layer.for_each_param(&mut |_, grad| g.push(grad.to_vec()));
    let db = g.pop().unwrap_or_default();
    let dg = g.pop().unwrap_or_default();
    (y, dx, dg, db)
}

fn layer(c: usize, s: usize, gamma: &[f32], beta: &[f32]) -> BatchNorm {
    let mut bn = BatchNorm::new(c, s, 1e-5, true);
    bn.gamma = Some(gamma.to_vec());
    bn.beta = Some(beta.to_vec());
    bn
}

/// Ghost BN: each virtual batch (8, 8 and the remaining 4 of 20 examples) is normalized by its
/// own statistics, as the f64 twin computes them batch by batch; dgamma and dbeta sum over the
/// virtual batches; the running statistics take one step with the count-weighted averages of
/// the batches' means and unbiased variances. In both layouts, with a large offset too.
#[test]
fn ghost_batches_match_the_f64_twin_batch_by_batch() {
    for &(c, s, offset) in &[
        (5usize, 1usize, 0.5f64),
        (3, 9, -2.0),
        (4, 1, 1e4),
        (2, 16, 1e4),
    ] {
        let (n, g) = (20usize, 8usize);
        let mut rng = Lcg(7 + c as u64);
        let spread = if offset == 1e4 { 1e-2 } else { 1.5 };
        let x = rng.vec_f32(n * c * s, spread, offset);
        let dy = rng.vec_f32(n * c * s, 1.0, 0.0);
        let gamma = rng.vec_f32(c, 0.5, 1.0);
        let beta = rng.vec_f32(c, 0.5, 0.0);
        let mut bn = layer(c, s, &gamma, &beta);
        bn.ghost = Some(g);
        assert_eq!(bn.virtual_batches(n), 3);
        let (y, dx, dg, db) = run(&mut bn, Mode::Train, &x, &dy, n);

        let (g64, b64) = (to64(&gamma), to64(&beta));
        let (mut wy, mut wdx) = (Vec::new(), Vec::new());
        let (mut wdg, mut wdb) = (vec![0.0; c], vec![0.0; c]);
        let (mut means, mut uvars, mut counts) = (Vec::new(), Vec::new(), Vec::new());
        for a in (0..n).step_by(g) {
            let nk = g.min(n - a);
            let d = Dims { n: nk, c, s };
            let span = a * c * s..(a + nk) * c * s;
            let (xk, dyk) = (to64(&x[span.clone()]), to64(&dy[span]));
            let f = reference::forward_train(&xk, d, &g64, &b64, 1e-5);
            let (dxk, dgk, dbk) = reference::backward_train(&xk, &dyk, d, &g64, 1e-5);
            wy.extend(f.y);
            wdx.extend(dxk);
            for ch in 0..c {
                wdg[ch] += dgk[ch];
                wdb[ch] += dbk[ch];
            }
            let m = (nk * s) as f64;
            means.push(f.mean);
            uvars.push(f.var.iter().map(|v| v * m / (m - 1.0)).collect::<Vec<_>>());
            counts.push(m);
        }
        let case = format!("c={c} s={s} offset={offset}");
        assert!(err(&y, &wy) < 1e-5, "{case}: y {}", err(&y, &wy));
        assert!(err(&dx, &wdx) < 1e-5, "{case}: dx {}", err(&dx, &wdx));
        assert!(err(&dg, &wdg) < 1e-5, "{case}: dgamma {}", err(&dg, &wdg));
        assert!(err(&db, &wdb) < 1e-5, "{case}: dbeta {}", err(&db, &wdb));
        let total: f64 = counts.iter().sum();
        for ch in 0..c {
            let mean: f64 = (0..3).map(|k| counts[k] / total * means[k][ch]).sum();
            let var: f64 = (0..3).map(|k| counts[k] / total * uvars[k][ch]).sum();
            let (want_m, want_v) = (0.1 * mean, 0.9 + 0.1 * var);
            let scale = want_m.abs().max(1.0);
            assert!(
                (bn.running_mean[ch] as f64 - want_m).abs() < 1e-6 * scale,
                "{case}: running mean {} vs {want_m}",
                bn.running_mean[ch]
            );
            assert!(
                (bn.running_var[ch] as f64 - want_v).abs() < 1e-5 * want_v.max(1.0),
                "{case}: running var {} vs {want_v}",
                bn.running_var[ch]
            );
        }
        assert_eq!(bn.num_batches_tracked, 1, "one step, one update");
    }
}

/// A ghost batch at least as large as the mini-batch is batch normalization, bit for bit.
#[test]
fn ghost_as_large_as_the_batch_is_batch_norm() {
    for &(c, s) in &[(6usize, 1usize), (3, 25)] {
        let n = 12;
        let mut rng = Lcg(99);
        let x = rng.vec_f32(n * c * s, 2.0, 0.3);
        let dy = rng.vec_f32(n * c * s, 1.0, 0.0);
        let gamma = rng.vec_f32(c, 0.5, 1.0);
        let beta = rng.vec_f32(c, 0.5, 0.0);
        let mut plain = layer(c, s, &gamma, &beta);
        let want = run(&mut plain, Mode::Train, &x, &dy, n);
        for g in [12, 13, 1000] {
            let mut ghost = layer(c, s, &gamma, &beta);
            ghost.ghost = Some(g);
            assert_eq!(run(&mut ghost, Mode::Train, &x, &dy, n), want, "ghost {g}");
            assert_eq!(ghost.running_mean, plain.running_mean);
            assert_eq!(ghost.running_var, plain.running_var);
        }
    }
}

/// Finite differences on the f32 layer: ghost batches of 4 in 11 examples (4, 4, 3), and a
/// feature-map layer in ghost batches of 2.
#[test]
fn ghost_batch_norm_finite_differences() {
    let mut rng = Lcg(5);
    let make = |c: usize, s: usize, g: usize| {
        move || -> Box<dyn Layer> {
            let mut bn = BatchNorm::new(c, s, 1e-5, true);
            bn.gamma = Some((0..c).map(|i| 0.7 + 0.1 * i as f32).collect());
            bn.beta = Some((0..c).map(|i| 0.2 * i as f32 - 0.1).collect());
            bn.ghost = Some(g);
            Box::new(bn)
        }
    };
    check(
        &make(4, 1, 4),
        rng.vec_f32(44, 1.0, 0.2),
        11,
        Mode::Train,
        1e-2,
        5e-3,
    );
    check(
        &make(2, 9, 2),
        rng.vec_f32(6 * 18, 1.0, -0.4),
        6,
        Mode::Train,
        1e-2,
        5e-3,
    );
}

/// Batch renormalization with r held at 1 and d at 0 (the start of its schedule) is batch
/// normalization bit for bit: forward, backward and running statistics.
#[test]
fn renorm_at_its_start_is_batch_norm() {
    for &(c, s) in &[(6usize, 1usize), (3, 25)] {
        let n = 12;
        let mut rng = Lcg(3);
        let x = rng.vec_f32(n * c * s, 2.0, 0.3);
        let dy = rng.vec_f32(n * c * s, 1.0, 0.0);
        let gamma = rng.vec_f32(c, 0.5, 1.0);
        let beta = rng.vec_f32(c, 0.5, 0.0);
        let mut plain = layer(c, s, &gamma, &beta);
        plain.running_mean = rng.vec_f32(c, 1.0, 0.0);
        let mut brn = layer(c, s, &gamma, &beta);
        brn.running_mean = plain.running_mean.clone();
        brn.set_renorm(Some(Renorm {
            rmax: 3.0,
            dmax: 5.0,
        }));
        brn.set_renorm_limits(Renorm::NONE);
        for _ in 0..2 {
            assert_eq!(
                run(&mut brn, Mode::Train, &x, &dy, n),
                run(&mut plain, Mode::Train, &x, &dy, n)
            );
        }
        assert_eq!(brn.running_mean, plain.running_mean);
        assert_eq!(brn.running_var, plain.running_var);
    }
}

/// The f64 twin of batch renormalization, from the paper's Algorithm 1 with r and d
/// recomputed from x (so finite differences of it see how they move: not at all where they
/// are clipped).
fn brn64(
    x: &[f64],
    d: Dims,
    gamma: &[f64],
    beta: &[f64],
    rm: &[f64],
    rv: &[f64],
    lim: (f64, f64),
) -> Vec<f64> {
    let eps = 1e-5;
    let f = reference::forward_train(x, d, &vec![1.0; d.c], &vec![0.0; d.c], eps);
    let mut y = f.y;
    for ch in 0..d.c {
        let sigma = (rv[ch] + eps).sqrt();
        let r = ((f.var[ch] + eps).sqrt() / sigma).clamp(1.0 / lim.0, lim.0);
        let dd = ((f.mean[ch] - rm[ch]) / sigma).clamp(-lim.1, lim.1);
        for i in 0..d.n {
            for p in 0..d.s {
                let k = (i * d.c + ch) * d.s + p;
                y[k] = gamma[ch] * (y[k] * r + dd) + beta[ch];
            }
        }
    }
    y
}

/// Batch renormalization against its f64 twin (forward) and against central differences of
/// the twin in f64 where r and d are clipped (the batch's spread is far from the running
/// variance and its mean far from the running mean), so that they are constants as the
/// paper's gradient treats them; in both layouts.
#[test]
fn renorm_matches_its_f64_twin_and_finite_differences_where_clipped() {
    for &(c, s) in &[(4usize, 1usize), (2, 9)] {
        let n = 8;
        let d = Dims { n, c, s };
        let mut rng = Lcg(17);
        // Spread about 2.3, mean about 4: running (0, 1) with rmax 1.5, dmax 0.5 clips both.
        let x = rng.vec_f32(d.len(), 4.0, 4.0);
        let dy = rng.vec_f32(d.len(), 1.0, 0.0);
        let gamma = rng.vec_f32(c, 0.3, 1.0);
        let beta = rng.vec_f32(c, 0.3, 0.0);
        let lim = (1.5f64, 0.5f64);
        let mut bn = layer(c, s, &gamma, &beta);
        bn.set_renorm(Some(Renorm {
            rmax: lim.0 as f32,
            dmax: lim.1 as f32,
        }));
        let (rm, rv) = (vec![0.0; c], vec![1.0; c]);
        let (y, dx, dg, db) = run(&mut bn, Mode::Train, &x, &dy, n);
        let (x64, g64, b64) = (to64(&x), to64(&gamma), to64(&beta));
        let want = brn64(&x64, d, &g64, &b64, &rm, &rv, lim);
        assert!(err(&y, &want) < 1e-5, "y {}", err(&y, &want));
        // Both clipped: r = rmax (the spread is above 1.5) and d = +-dmax.
        let f = reference::forward_train(&x64, d, &vec![1.0; c], &vec![0.0; c], 1e-5);
        for ch in 0..c {
            assert!((f.var[ch] + 1e-5).sqrt() > lim.0, "r not clipped");
            assert!(f.mean[ch].abs() > lim.1, "d not clipped");
        }
        let loss = |x: &[f64], g: &[f64], b: &[f64]| -> f64 {
            brn64(x, d, g, b, &rm, &rv, lim)
                .iter()
                .zip(&dy)
                .map(|(a, &w)| a * w as f64)
                .sum()
        };
        let h = 1e-6;
        for j in 0..d.len() {
            let (mut p, mut m) = (x64.clone(), x64.clone());
            p[j] += h;
            m[j] -= h;
            let num = (loss(&p, &g64, &b64) - loss(&m, &g64, &b64)) / (2.0 * h);
            assert!(
                (num - dx[j] as f64).abs() < 1e-4 * (1.0 + num.abs()),
                "dx[{j}]: finite difference {num}, backward {}",
                dx[j]
            );
        }
        for ch in 0..c {
            let (mut p, mut m) = (g64.clone(), g64.clone());
            p[ch] += h;
            m[ch] -= h;
            let num = (loss(&x64, &p, &b64) - loss(&x64, &m, &b64)) / (2.0 * h);
            assert!(
                (num - dg[ch] as f64).abs() < 1e-4 * (1.0 + num.abs()),
                "dgamma"
            );
            let (mut p, mut m) = (b64.clone(), b64.clone());
            p[ch] += h;
            m[ch] -= h;
            let num = (loss(&x64, &g64, &p) - loss(&x64, &g64, &m)) / (2.0 * h);
            assert!(
                (num - db[ch] as f64).abs() < 1e-4 * (1.0 + num.abs()),
                "dbeta"
            );
        }
    }
}

/// Frozen BN: training mode normalizes with the inference statistics and leaves them alone;
/// forward and backward are those of inference mode, and gamma and beta still get gradients.
#[test]
fn frozen_batch_norm_trains_in_inference_mode() {
    for &(c, s) in &[(5usize, 1usize), (3, 16)] {
        let n = 6;
        let mut rng = Lcg(21);
        let x = rng.vec_f32(n * c * s, 2.0, 0.5);
        let dy = rng.vec_f32(n * c * s, 1.0, 0.0);
        let gamma = rng.vec_f32(c, 0.5, 1.0);
        let beta = rng.vec_f32(c, 0.5, 0.0);
        let mut eval = layer(c, s, &gamma, &beta);
        eval.running_mean = rng.vec_f32(c, 1.0, 0.0);
        eval.running_var = rng.vec_f32(c, 0.5, 1.5);
        let mut frozen = layer(c, s, &gamma, &beta);
        frozen.running_mean = eval.running_mean.clone();
        frozen.running_var = eval.running_var.clone();
        frozen.frozen = true;
        let want = run(&mut eval, Mode::Eval, &x, &dy, n);
        let got = run(&mut frozen, Mode::Train, &x, &dy, n);
        assert_eq!(got, want);
        assert!(got.2.iter().any(|&g| g != 0.0), "gamma learns");
        assert_eq!(frozen.running_mean, eval.running_mean);
        assert_eq!(frozen.running_var, eval.running_var);
        assert_eq!(frozen.num_batches_tracked, 0);
    }
}

/// The schedule: batch normalization through the warm-up, then linear ramps that reach the
/// final limits at their fractions of the run and stay there.
#[test]
fn renorm_schedule_relaxes_the_limits_on_time() {
    let s = RenormSchedule::default();
    let end = Renorm {
        rmax: 3.0,
        dmax: 5.0,
    };
    assert_eq!(s.limits(end, 0, 1000), Renorm::NONE);
    assert_eq!(s.limits(end, 100, 1000), Renorm::NONE);
    let mid = s.limits(end, 300, 1000);
    assert!((mid.dmax - 2.5).abs() < 1e-6, "{mid:?}");
    assert!((mid.rmax - (1.0 + 2.0 * 2.0 / 7.0)).abs() < 1e-6, "{mid:?}");
    assert_eq!(s.limits(end, 500, 1000).dmax, 5.0);
    assert_eq!(s.limits(end, 800, 1000), end);
    assert_eq!(s.limits(end, 999, 1000), end);
    let p = RenormSchedule::parse("0,0.5,0.25").unwrap();
    assert_eq!(p.limits(end, 250, 1000).dmax, 5.0);
    for bad in [
        "",
        "0.1,0.8",
        "0.5,0.2,0.6",
        "0.1,0.8,1.5",
        "a,b,c",
        "-0.1,0.5,0.5",
    ] {
        let e = RenormSchedule::parse(bad).unwrap_err().to_string();
        assert!(e.contains("--renorm-schedule"), "{bad}: {e}");
    }
}

/// Algorithm 2 with ghost batches averages the virtual batches' statistics.
#[test]
fn population_statistics_of_ghost_batches() {
    let (n, c, g) = (12usize, 3usize, 4usize);
    let mut rng = Lcg(8);
    let x = rng.vec_f32(n * c, 1.0, 0.0);
    let mut bn = BatchNorm::new(c, 1, 1e-5, true);
    bn.ghost = Some(g);
    bn.begin_population();
    let mut y = vec![0f32; n * c];
    bn.forward(ctx(Mode::Population), &x, &mut y, n).unwrap();
    assert_eq!(bn.finish_population(), 3, "three virtual batches");
    let (mean, var) = (
        bn.population_mean.clone().unwrap(),
        bn.population_var.clone().unwrap(),
    );
    for ch in 0..c {
        let (mut m, mut v) = (0.0f64, 0.0f64);
        for k in 0..3 {
            let vals: Vec<f64> = (0..g).map(|i| x[(k * g + i) * c + ch] as f64).collect();
            let mu = vals.iter().sum::<f64>() / g as f64;
            m += mu / 3.0;
            v += vals.iter().map(|a| (a - mu) * (a - mu)).sum::<f64>() / (g as f64 - 1.0) / 3.0;
        }
        assert!((mean[ch] as f64 - m).abs() < 1e-6);
        assert!((var[ch] as f64 - v).abs() < 1e-6);
    }
}
