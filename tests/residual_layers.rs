//! The layers of the ResNet model files: `Residual`, strided convolutions, `AvgPool2d` without
//! counting the padding, `Flatten` and `Tanh`; and the errors of every constructor on bad
//! geometry.
//!
//! - backward passes against central differences (loss accumulated in f64, tests/common);
//! - the ResNet-20 downsampling convolutions (3x3 stride 2 padding 1, 1x1 stride 2) against a
//!   direct f64 convolution, forward, dx, dW and db, on one and two threads (identical bits);
//! - a basic block (BN, projection) against a direct f64 forward pass built from the same
//!   definitions, and its `state_dict` names against ../shared/peers/torch_resnet.py's;
//! - constructors return errors that say what is wrong, never panic;
//! - timings of the strided convolutions (`--ignored`).

mod common;

use bnlab::nn::{
    AvgPool2d, BatchNorm, Concat, Conv2d, Ctx, Flatten, GlobalAvgPool, Layer, Linear, MaxPool2d,
    Mode, Relu, Residual, Sequential, Tanh, TensorMut,
};
use bnlab::Error;
use common::{check, ctx, Lcg};

// ---------------------------------------------------------------------------------------------
// Builders.

#[derive(Clone, Copy, Debug)]
struct ConvShape {
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    s: usize,
    p: usize,
    bias: bool,
}

impl ConvShape {
    fn oh(&self) -> usize {
        (self.h + 2 * self.p - self.k) / self.s + 1
    }
    fn ow(&self) -> usize {
        (self.w + 2 * self.p - self.k) / self.s + 1
    }
}

fn conv(sh: ConvShape, seed: u64) -> Conv2d {
    let mut rng = Lcg(seed);
    let mut l =
        Conv2d::new(sh.c, sh.o, sh.k, sh.s, sh.p, sh.bias, sh.h, sh.w).expect("conv geometry");
    let fan_in = (sh.c * sh.k * sh.k) as f64;
    l.set_weight(&rng.vec_f32(sh.o * sh.c * sh.k * sh.k, 1.0 / fan_in.sqrt(), 0.0));
    if let Some(b) = &mut l.bias {
        b.copy_from_slice(&rng.vec_f32(sh.o, 0.5, 0.0));
    }
    l
}

/// A BatchNorm2d with non-trivial gamma and beta.
fn bn(c: usize, hw: usize, seed: u64) -> BatchNorm {
    let mut b = BatchNorm::new(c, hw, 1e-5, true);
    let mut rng = Lcg(seed);
    b.gamma = Some(rng.vec_f32(c, 0.3, 1.0));
    b.beta = Some(rng.vec_f32(c, 0.2, 0.0));
    b
}

/// torch_resnet.py's `BasicBlock(cin, cout, stride, bn)` on `h x w` maps: conv1 (3x3, stride,
/// padding 1) -> bn1 -> relu -> conv2 (3x3) -> bn2, plus the shortcut (identity, or
/// `downsample` = 1x1 stride conv [-> BN] when the shape changes), then ReLU of the sum.
fn basic_block(
    cin: usize,
    cout: usize,
    stride: usize,
    with_bn: bool,
    h: usize,
    seed: u64,
) -> Residual {
    let c1 = ConvShape {
        c: cin,
        h,
        w: h,
        o: cout,
        k: 3,
        s: stride,
        p: 1,
        bias: !with_bn,
    };
    let oh = c1.oh();
    let c2 = ConvShape {
        c: cout,
        h: oh,
        w: oh,
        o: cout,
        k: 3,
        s: 1,
        p: 1,
        bias: !with_bn,
    };
    let mut main: Vec<(&str, Box<dyn Layer>)> = vec![("conv1", Box::new(conv(c1, seed)))];
    if with_bn {
        main.push(("bn1", Box::new(bn(cout, oh * oh, seed + 1))));
    }
    main.push(("", Box::new(Relu::new(cout * oh * oh))));
    main.push(("conv2", Box::new(conv(c2, seed + 2))));
    if with_bn {
        main.push(("bn2", Box::new(bn(cout, oh * oh, seed + 3))));
    }
    let main = Sequential::named(main).expect("main path");
    let shortcut = (stride != 1 || cin != cout).then(|| {
        let cs = ConvShape {
            c: cin,
            h,
            w: h,
            o: cout,
            k: 1,
            s: stride,
            p: 0,
            bias: !with_bn,
        };
        let mut layers: Vec<Box<dyn Layer>> = vec![Box::new(conv(cs, seed + 4))];
        if with_bn {
            layers.push(Box::new(bn(cout, oh * oh, seed + 5)));
        }
        let ds: Box<dyn Layer> = Box::new(Sequential::new(layers));
        ("downsample".to_string(), ds)
    });
    Residual::new(main, shortcut, true).expect("basic block")
}

/// Forward and backward of `layer` on `threads` threads; returns y, dx and the parameter
/// gradients.
fn run(
    layer: &mut dyn Layer,
    x: &[f32],
    dy: &[f32],
    n: usize,
    threads: usize,
) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let c = Ctx {
        mode: Mode::Train,
        threads,
    };
    layer.reserve(n.max(1));
    let mut y = vec![f32::NAN; n * layer.out_size()];
    layer.forward(c, x, &mut y, n).unwrap();
    let mut dx = vec![f32::NAN; n * layer.in_size()];
    layer.backward(c, x, &y, dy, Some(&mut dx), n);
    let mut grads = Vec::new();
    layer.for_each_param(&mut |_, g| grads.push(g.to_vec()));
    (y, dx, grads)
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{j}]: got {g}, want {w}"
        );
    }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

// ---------------------------------------------------------------------------------------------
// Direct references in f64: the definitions, one term at a time.

struct Direct {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

/// Convolution of `x` (f64) and its gradients for the upstream gradient `dy`.
#[allow(clippy::needless_range_loop)]
fn direct_conv(
    sh: ConvShape,
    n: usize,
    x: &[f64],
    w: &[f32],
    b: Option<&[f32]>,
    dy: &[f64],
) -> Direct {
    let (oh, ow) = (sh.oh(), sh.ow());
    let xi = |i: usize, c: usize, y: usize, x_: usize| ((i * sh.c + c) * sh.h + y) * sh.w + x_;
    let wi = |o: usize, c: usize, a: usize, b: usize| ((o * sh.c + c) * sh.k + a) * sh.k + b;
    let yi = |i: usize, o: usize, y: usize, x_: usize| ((i * sh.o + o) * oh + y) * ow + x_;
    let mut r = Direct {
        y: vec![0.0; n * sh.o * oh * ow],
        dx: vec![0.0; x.len()],
        dw: vec![0.0; w.len()],
        db: vec![0.0; sh.o],
    };
    for i in 0..n {
        for o in 0..sh.o {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dy.get(yi(i, o, oy, ox)).copied().unwrap_or(0.0);
                    let mut s = b.map_or(0.0, |b| b[o] as f64);
                    r.db[o] += g;
                    for c in 0..sh.c {
                        for a in 0..sh.k {
                            for bb in 0..sh.k {
                                let iy = (oy * sh.s + a) as isize - sh.p as isize;
                                let ix = (ox * sh.s + bb) as isize - sh.p as isize;
                                if iy < 0 || ix < 0 || iy >= sh.h as isize || ix >= sh.w as isize {
                                    continue;
                                }
                                let xv = xi(i, c, iy as usize, ix as usize);
                                let wv = wi(o, c, a, bb);
                                s += x[xv] * w[wv] as f64;
                                r.dx[xv] += w[wv] as f64 * g;
                                r.dw[wv] += x[xv] * g;
                            }
                        }
                    }
                    r.y[yi(i, o, oy, ox)] = s;
                }
            }
        }
    }
    r
}

/// Batch normalization in training mode (batch statistics, biased variance) of `n x c x hw`.
fn direct_bn(x: &[f64], n: usize, c: usize, hw: usize, b: &BatchNorm) -> Vec<f64> {
    let (gamma, beta) = (b.gamma.as_ref().unwrap(), b.beta.as_ref().unwrap());
    let mut y = vec![0.0; x.len()];
    for ch in 0..c {
        let vals = |i: usize| (i * c + ch) * hw..(i * c + ch + 1) * hw;
        let m = (n * hw) as f64;
        let mean = (0..n).flat_map(vals).map(|j| x[j]).sum::<f64>() / m;
        let var = (0..n)
            .flat_map(vals)
            .map(|j| (x[j] - mean).powi(2))
            .sum::<f64>()
            / m;
        for j in (0..n).flat_map(vals) {
            y[j] = gamma[ch] as f64 * (x[j] - mean) / (var + b.eps as f64).sqrt() + beta[ch] as f64;
        }
    }
    y
}

fn relu64(v: &mut [f64]) {
    for a in v {
        *a = a.max(0.0);
    }
}

// ---------------------------------------------------------------------------------------------
// Strided convolutions.

/// ResNet-20's downsampling convolutions: 3x3 stride 2 padding 1 (conv1 of the first block of
/// a stage) and 1x1 stride 2 (its projection), 16 -> 32 and 32 -> 64 channels, on CIFAR's maps
/// (32 -> 16 -> 8) and MNIST's (28 -> 14 -> 7); plus odd sizes, stride 3 and biases.
fn downsampling_shapes() -> Vec<ConvShape> {
    let mut v = Vec::new();
    for (c, h, o) in [(16, 32, 32), (32, 16, 64), (16, 28, 32), (32, 14, 64)] {
        for (k, p) in [(3, 1), (1, 0)] {
            v.push(ConvShape {
                c,
                h,
                w: h,
                o,
                k,
                s: 2,
                p,
                bias: false,
            });
        }
    }
    for (c, h, w, o, k, s, p) in [
        (3, 7, 7, 5, 1, 2, 0),
        (4, 8, 5, 3, 1, 3, 0),
        (2, 9, 6, 3, 3, 2, 1),
        (5, 7, 9, 4, 1, 2, 0),
        // 3x3 stride 2 padding 1 on odd and tiny maps (phase planes with a row or column of
        // padding; a single output).
        (3, 7, 7, 4, 3, 2, 1),
        (2, 6, 5, 3, 3, 2, 1),
        (2, 1, 4, 3, 3, 2, 1),
        (2, 3, 1, 2, 3, 2, 1),
        (1, 1, 1, 2, 3, 2, 1),
        (2, 2, 2, 2, 3, 2, 1),
        // Padding beyond the kernel (allowed by PyTorch): whole rows of padding.
        (2, 4, 5, 3, 1, 1, 2),
        (2, 5, 4, 2, 3, 2, 3),
    ] {
        v.push(ConvShape {
            c,
            h,
            w,
            o,
            k,
            s,
            p,
            bias: true,
        });
    }
    v
}

#[test]
fn strided_convs_match_direct_convolution_on_one_and_two_threads() {
    for (si, sh) in downsampling_shapes().into_iter().enumerate() {
        for n in [1, 3] {
            let mut rng = Lcg(300 + si as u64);
            let x = rng.vec_f32(n * sh.c * sh.h * sh.w, 1.0, 0.0);
            let mut layers = [conv(sh, 50 + si as u64), conv(sh, 50 + si as u64)];
            let dy = rng.vec_f32(n * layers[0].out_size(), 1.0, 0.0);
            let want = direct_conv(
                sh,
                n,
                &f64s(&x),
                &layers[0].weight.clone(),
                layers[0].bias.clone().as_deref(),
                &f64s(&dy),
            );
            let what = format!("{sh:?} n={n}");
            let one = run(&mut layers[0], &x, &dy, n, 1);
            let two = run(&mut layers[1], &x, &dy, n, 2);
            assert_close(&one.0, &want.y, 1e-5, &format!("{what} y"));
            assert_close(&one.1, &want.dx, 1e-5, &format!("{what} dx"));
            assert_close(&one.2[0], &want.dw, 1e-5, &format!("{what} dw"));
            if sh.bias {
                assert_close(&one.2[1], &want.db, 1e-5, &format!("{what} db"));
            }
            assert_eq!(one, two, "{what}: one and two threads differ");
        }
    }
}

#[test]
fn strided_conv_gradients() {
    for (si, sh) in downsampling_shapes().into_iter().enumerate() {
        // The 32x32 maps at full width, the others as they are.
        let n = 2;
        let x = Lcg(400 + si as u64).vec_f32(n * sh.c * sh.h * sh.w, 1.0, 0.0);
        let params = check(
            &|| Box::new(conv(sh, 60 + si as u64)),
            x,
            n,
            Mode::Train,
            1e-2,
            3e-3,
        );
        assert_eq!(params, 1 + usize::from(sh.bias), "{sh:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// AvgPool2d without counting the padding.

/// Average over the taps inside the input (`count_include_pad=False`), and its adjoint.
#[allow(clippy::too_many_arguments)]
fn direct_avg_exclude_pad(
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    n: usize,
    x: &[f32],
    dy: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    let oh = (h + 2 * p - k) / s + 1;
    let ow = (w + 2 * p - k) / s + 1;
    let mut y = vec![0.0; n * c * oh * ow];
    let mut dx = vec![0.0; x.len()];
    for plane in 0..n * c {
        for oy in 0..oh {
            for ox in 0..ow {
                let mut taps = Vec::new();
                for a in 0..k {
                    for b in 0..k {
                        let iy = (oy * s + a) as isize - p as isize;
                        let ix = (ox * s + b) as isize - p as isize;
                        if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                            taps.push(plane * h * w + iy as usize * w + ix as usize);
                        }
                    }
                }
                let o = plane * oh * ow + oy * ow + ox;
                let cnt = taps.len() as f64;
                y[o] = taps.iter().map(|&t| x[t] as f64).sum::<f64>() / cnt;
                for &t in &taps {
                    dx[t] += dy[o] as f64 / cnt;
                }
            }
        }
    }
    (y, dx)
}

const POOL_SHAPES: [(usize, usize, usize, usize, usize); 6] = [
    // (k, s, p, h, w)
    (3, 2, 1, 7, 7),
    (3, 2, 1, 8, 6),
    (3, 1, 1, 5, 6), // the box filter's geometry, on the general path
    (2, 2, 1, 5, 5),
    (5, 2, 2, 9, 7),
    (2, 2, 0, 6, 4), // no padding: the same as counting it
];

#[test]
fn avg_pool_without_padding_matches_direct_and_threads() {
    let c = 3;
    for (si, &(k, s, p, h, w)) in POOL_SHAPES.iter().enumerate() {
        for n in [1, 4] {
            let mut rng = Lcg(500 + si as u64);
            let x = rng.vec_f32(n * c * h * w, 1.0, 0.0);
            let mk = || AvgPool2d::new(c, k, s, p, h, w, false).unwrap();
            let dy = rng.vec_f32(n * mk().out_size(), 1.0, 0.0);
            let (y, dx) = direct_avg_exclude_pad(c, h, w, k, s, p, n, &x, &dy);
            let one = run(&mut mk(), &x, &dy, n, 1);
            let two = run(&mut mk(), &x, &dy, n, 2);
            let what = format!("k{k} s{s} p{p} {h}x{w} n={n}");
            assert_close(&one.0, &y, 1e-6, &format!("{what} y"));
            assert_close(&one.1, &dx, 1e-6, &format!("{what} dx"));
            assert_eq!(one, two, "{what}: one and two threads differ");
            if p == 0 {
                // Nothing to count: identical to the default.
                let inc = run(
                    &mut AvgPool2d::new(c, k, s, p, h, w, true).unwrap(),
                    &x,
                    &dy,
                    n,
                    1,
                );
                assert_eq!(one, inc, "{what}");
            }
        }
    }
}

#[test]
fn avg_pool_without_padding_gradients() {
    for &(k, s, p, h, w) in &POOL_SHAPES {
        let n = 2;
        let x = Lcg(22).vec_f32(n * 3 * h * w, 1.0, 0.0);
        check(
            &|| Box::new(AvgPool2d::new(3, k, s, p, h, w, false).unwrap()),
            x,
            n,
            Mode::Train,
            1e-2,
            2e-3,
        );
    }
}

#[test]
fn avg_pool_count_include_pad_false_averages_inside_only() {
    // A 3x3 map of ones: every window's mean over its taps inside the input is 1, where
    // counting the padding gives 4/9 at the corners.
    let mut l = AvgPool2d::new(1, 3, 1, 1, 3, 3, false).unwrap();
    assert!(!l.count_include_pad());
    assert!(
        l.describe().contains("count_include_pad=False"),
        "{}",
        l.describe()
    );
    l.reserve(1);
    let mut y = [0f32; 9];
    l.forward(ctx(Mode::Train), &[1.0; 9], &mut y, 1).unwrap();
    assert_eq!(y, [1.0; 9]);
    // Kernel 3, stride 2, padding 1 on 4x4: windows of 4, 6, 6, 9 taps... the top-left sees 4.
    let mut l = AvgPool2d::new(1, 3, 2, 1, 4, 4, false).unwrap();
    l.reserve(1);
    let x: Vec<f32> = (0..16).map(|v| v as f32).collect();
    let mut y = [0f32; 4];
    l.forward(ctx(Mode::Train), &x, &mut y, 1).unwrap();
    assert_eq!(y[0], (0.0 + 1.0 + 4.0 + 5.0) / 4.0);
    assert_eq!(y[1], (1.0 + 2.0 + 3.0 + 5.0 + 6.0 + 7.0) / 6.0);
    assert_eq!(
        y[3],
        (5.0 + 6.0 + 7.0 + 9.0 + 10.0 + 11.0 + 13.0 + 14.0 + 15.0) / 9.0
    );
    let mut dx = [f32::NAN; 16];
    l.backward(
        ctx(Mode::Train),
        &x,
        &y,
        &[4.0, 0.0, 0.0, 0.0],
        Some(&mut dx),
        1,
    );
    let mut want = [0f32; 16];
    for i in [0, 1, 4, 5] {
        want[i] = 1.0;
    }
    assert_eq!(dx, want);
}

// ---------------------------------------------------------------------------------------------
// Flatten and Tanh.

#[test]
fn flatten_copies_both_ways() {
    let mut l = Flatten::new(3, 4, 5).unwrap();
    assert_eq!((l.in_size(), l.out_size()), (60, 60));
    assert_eq!(l.describe(), "Flatten(start_dim=1, end_dim=-1) on 3x4x5");
    let n = 2;
    let x = Lcg(7).vec_f32(n * 60, 1.0, 0.0);
    let dy = Lcg(8).vec_f32(n * 60, 1.0, 0.0);
    let (y, dx, grads) = run(&mut l, &x, &dy, n, 2);
    assert_eq!((y, dx), (x.clone(), dy));
    assert!(grads.is_empty());
    check(
        &|| Box::new(Flatten::new(3, 4, 5).unwrap()),
        x,
        n,
        Mode::Train,
        1e-2,
        1e-3,
    );
}

#[test]
fn tanh_forward_backward() {
    let size = 40_000; // above the elementwise layers' one-thread limit for n = 2
    let n = 2;
    let x = Lcg(9).vec_f32(n * size, 4.0, 0.0);
    let dy = Lcg(10).vec_f32(n * size, 1.0, 0.0);
    let one = run(&mut Tanh::new(size), &x, &dy, n, 1);
    let two = run(&mut Tanh::new(size), &x, &dy, n, 2);
    assert_eq!(one, two);
    let want: Vec<f64> = x.iter().map(|&v| (v as f64).tanh()).collect();
    assert_close(&one.0, &want, 3e-7, "tanh y");
    let want_dx: Vec<f64> = x
        .iter()
        .zip(&dy)
        .map(|(&v, &g)| g as f64 * (1.0 - (v as f64).tanh().powi(2)))
        .collect();
    assert_close(&one.1, &want_dx, 1e-6, "tanh dx");
    assert_eq!(Tanh::new(3).describe(), "Tanh()");
    let x = Lcg(11).vec_f32(3 * 50, 2.0, 0.0);
    check(&|| Box::new(Tanh::new(50)), x, 3, Mode::Train, 1e-3, 2e-3);
}

// ---------------------------------------------------------------------------------------------
// Residual.

#[test]
fn basic_block_gradients_with_bn_and_projection() {
    // Two ReLUs: a nudge of a weight moves a whole channel (through BN, every value of it), so
    // steps are small enough that no value crosses a kink (checked: at 1e-2 some do, and the
    // difference quotients converge to the analytic gradients as the step shrinks).
    let (n, h) = (3, 6);
    let x = Lcg(31).vec_f32(n * 4 * h * h, 1.0, 0.2);
    let make = || -> Box<dyn Layer> { Box::new(basic_block(4, 6, 2, true, h, 70)) };
    let params = check(&make, x.clone(), n, Mode::Train, 2e-4, 1e-2);
    // conv1, bn1 (2), conv2, bn2 (2), downsample conv, downsample bn (2).
    assert_eq!(params, 9);
    check(&make, x, n, Mode::Eval, 2e-4, 1e-2);
}

#[test]
fn basic_block_gradients_plain_identity_and_projection() {
    let (n, h) = (2, 5);
    let x = Lcg(32).vec_f32(n * 4 * h * h, 1.0, 0.0);
    let make = || -> Box<dyn Layer> { Box::new(basic_block(4, 4, 1, false, h, 80)) };
    // Small steps for the ReLU kinks, as above.
    let params = check(&make, x, n, Mode::Train, 2e-3, 3e-3);
    assert_eq!(params, 4, "conv1 weight and bias, conv2 weight and bias");
    let x = Lcg(33).vec_f32(n * 3 * h * h, 1.0, 0.0);
    let make = || -> Box<dyn Layer> { Box::new(basic_block(3, 5, 1, false, h, 90)) };
    let params = check(&make, x, n, Mode::Train, 2e-3, 3e-3);
    assert_eq!(params, 6, "and the projection's weight and bias");
}

#[test]
fn residual_without_relu_gradients() {
    let (c, h, n) = (3, 4, 2);
    let sh = ConvShape {
        c,
        h,
        w: h,
        o: c,
        k: 3,
        s: 1,
        p: 1,
        bias: true,
    };
    let make = || -> Box<dyn Layer> {
        let main = Sequential::named(vec![("conv", Box::new(conv(sh, 5)) as Box<dyn Layer>)]);
        Box::new(Residual::new(main.unwrap(), None, false).unwrap())
    };
    let x = Lcg(34).vec_f32(n * c * h * h, 1.0, 0.0);
    check(&make, x, n, Mode::Train, 1e-2, 2e-3);
}

/// A basic block with BN and a projection against the direct f64 forward pass, in training
/// mode, on CIFAR's second stage shapes (16 -> 32 channels, 32x32 -> 16x16).
#[test]
fn basic_block_matches_direct_forward() {
    let (cin, cout, h, n) = (16, 32, 32, 2);
    let mut block = basic_block(cin, cout, 2, true, h, 100);
    let x = Lcg(35).vec_f32(n * cin * h * h, 1.0, 0.0);
    block.reserve(n);
    let mut y = vec![f32::NAN; n * block.out_size()];
    block.forward(ctx(Mode::Train), &x, &mut y, n).unwrap();

    // The same parameters, taken out of the block, through the definitions.
    let mut weights: Vec<Vec<f32>> = Vec::new();
    let mut bns: Vec<BatchNorm> = Vec::new();
    block.for_each_param(&mut |p, _| weights.push(p.to_vec()));
    block.for_each_batch_norm(&mut |b| {
        let mut c = BatchNorm::new(b.c, b.s, b.eps, true);
        c.gamma = b.gamma.clone();
        c.beta = b.beta.clone();
        bns.push(c);
    });
    assert_eq!(bns.len(), 3);
    let (w1, w2, wd) = (&weights[0], &weights[3], &weights[6]);
    let c1 = ConvShape {
        c: cin,
        h,
        w: h,
        o: cout,
        k: 3,
        s: 2,
        p: 1,
        bias: false,
    };
    let oh = c1.oh();
    let c2 = ConvShape {
        c: cout,
        h: oh,
        w: oh,
        o: cout,
        k: 3,
        s: 1,
        p: 1,
        bias: false,
    };
    let cd = ConvShape { k: 1, p: 0, ..c1 };
    let x64 = f64s(&x);
    let mut a = direct_bn(
        &direct_conv(c1, n, &x64, w1, None, &[]).y,
        n,
        cout,
        oh * oh,
        &bns[0],
    );
    relu64(&mut a);
    let main = direct_bn(
        &direct_conv(c2, n, &a, w2, None, &[]).y,
        n,
        cout,
        oh * oh,
        &bns[1],
    );
    let short = direct_bn(
        &direct_conv(cd, n, &x64, wd, None, &[]).y,
        n,
        cout,
        oh * oh,
        &bns[2],
    );
    let mut want: Vec<f64> = main.iter().zip(&short).map(|(a, b)| a + b).collect();
    relu64(&mut want);
    assert_close(&y, &want, 2e-4, "block y");
    // Main's output before the sum is kept for the backward pass.
    assert_close(&block.main_output()[..y.len()], &main, 2e-4, "main y");
}

#[test]
fn identity_residual_gradient_is_main_plus_dy() {
    // dx = main's dx + dy exactly: the same conv alone gives main's dx.
    let (c, h, n) = (4, 6, 3);
    let sh = ConvShape {
        c,
        h,
        w: h,
        o: c,
        k: 3,
        s: 1,
        p: 1,
        bias: true,
    };
    let x = Lcg(36).vec_f32(n * c * h * h, 1.0, 0.0);
    let dy = Lcg(37).vec_f32(n * c * h * h, 1.0, 0.0);
    let main = Sequential::named(vec![("conv", Box::new(conv(sh, 9)) as Box<dyn Layer>)]).unwrap();
    let mut res = Residual::new(main, None, false).unwrap();
    let (y, dx, grads) = run(&mut res, &x, &dy, n, 1);
    let (cy, cdx, cgrads) = run(&mut conv(sh, 9), &x, &dy, n, 1);
    let want_y: Vec<f32> = cy.iter().zip(&x).map(|(a, b)| a + b).collect();
    let want_dx: Vec<f32> = cdx.iter().zip(&dy).map(|(a, b)| a + b).collect();
    assert_eq!(y, want_y);
    assert_eq!(dx, want_dx);
    assert_eq!(grads, cgrads);
}

#[test]
fn relu_of_exact_zero_sum_passes_no_gradient() {
    // main(x) = -x (a 1x1 conv of weight -1), identity shortcut: every sum is exactly 0, so
    // y = 0 and, with PyTorch's ReLU derivative 0 at 0, every gradient is 0.
    let (h, n) = (5, 2);
    let mut c = Conv2d::new(1, 1, 1, 1, 0, false, h, h).unwrap();
    c.set_weight(&[-1.0]);
    let main = Sequential::named(vec![("conv", Box::new(c) as Box<dyn Layer>)]).unwrap();
    let mut res = Residual::new(main, None, true).unwrap();
    let x = Lcg(38).vec_f32(n * h * h, 1.0, 0.0);
    let dy = Lcg(39).vec_f32(n * h * h, 1.0, 0.0);
    let (y, dx, grads) = run(&mut res, &x, &dy, n, 1);
    assert!(y.iter().all(|&v| v == 0.0));
    assert!(dx.iter().all(|&v| v == 0.0), "{dx:?}");
    assert_eq!(grads, vec![vec![0.0]]);
}

#[test]
fn basic_block_is_thread_independent() {
    // Batch 5 (odd halves), maps large enough that the elementwise steps split too.
    for (cin, cout, stride, h) in [(16, 32, 2, 32), (16, 16, 1, 16), (32, 64, 2, 14)] {
        let n = 5;
        let x = Lcg(40).vec_f32(n * cin * h * h, 1.0, 0.0);
        let mut results = Vec::new();
        for threads in [1, 2] {
            let mut block = basic_block(cin, cout, stride, true, h, 110);
            let dy = Lcg(41).vec_f32(n * block.out_size(), 1.0, 0.0);
            let r = run(&mut block, &x, &dy, n, threads);
            assert!(r.0.iter().chain(&r.1).all(|v| v.is_finite()));
            let mut stats = Vec::new();
            block.for_each_batch_norm(&mut |b| {
                stats.push((b.running_mean.clone(), b.running_var.clone()))
            });
            results.push((r, stats));
        }
        assert_eq!(
            results[0], results[1],
            "{cin}->{cout} stride {stride} on {h}x{h}"
        );
    }
}

/// The `state_dict` keys of torch_resnet.py's `BasicBlock` registered as `layer2.0`, written
/// out by hand from the Python: conv1, bn1, conv2, bn2 attributes (the ReLUs are calls in
/// `forward`), then `downsample` an `nn.Sequential` (conv at 0, BN at 1); without BN the
/// convolutions have biases and `bn1`/`bn2` are `nn.Identity` (no state).
#[test]
fn basic_block_state_names_match_pytorch() {
    let bn_keys = |p: &str| -> Vec<String> {
        [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
        .iter()
        .map(|s| format!("{p}.{s}"))
        .collect()
    };
    for (with_bn, project) in [(true, true), (true, false), (false, true), (false, false)] {
        let (cin, stride) = if project { (16, 2) } else { (32, 1) };
        let mut block = basic_block(cin, 32, stride, with_bn, 16, 120);
        let mut want = Vec::new();
        let mut want_shapes = Vec::new();
        want.push("layer2.0.conv1.weight".to_string());
        want_shapes.push(vec![32, cin, 3, 3]);
        if with_bn {
            want.extend(bn_keys("layer2.0.bn1"));
            want_shapes.extend([vec![32], vec![32], vec![32], vec![32], vec![]]);
        } else {
            want.push("layer2.0.conv1.bias".into());
            want_shapes.push(vec![32]);
        }
        want.push("layer2.0.conv2.weight".into());
        want_shapes.push(vec![32, 32, 3, 3]);
        if with_bn {
            want.extend(bn_keys("layer2.0.bn2"));
            want_shapes.extend([vec![32], vec![32], vec![32], vec![32], vec![]]);
        } else {
            want.push("layer2.0.conv2.bias".into());
            want_shapes.push(vec![32]);
        }
        if project {
            want.push("layer2.0.downsample.0.weight".into());
            want_shapes.push(vec![32, 16, 1, 1]);
            if with_bn {
                want.extend(bn_keys("layer2.0.downsample.1"));
                want_shapes.extend([vec![32], vec![32], vec![32], vec![32], vec![]]);
            } else {
                want.push("layer2.0.downsample.0.bias".into());
                want_shapes.push(vec![32]);
            }
        }
        let mut got = Vec::new();
        let mut shapes = Vec::new();
        block.visit_state("layer2.0.", &mut |name, shape, t| {
            if let TensorMut::F32(v) = t {
                assert_eq!(v.len(), shape.iter().product::<usize>(), "{name}");
            }
            got.push(name.to_string());
            shapes.push(shape.to_vec());
        });
        assert_eq!(got, want, "bn={with_bn} projection={project}");
        assert_eq!(shapes, want_shapes, "bn={with_bn} projection={project}");
        // Parameters in the same order: weights, then BN's gamma and beta.
        let mut lens = Vec::new();
        block.for_each_param(&mut |p, g| {
            assert_eq!(p.len(), g.len());
            lens.push(p.len());
        });
        let want_lens: Vec<usize> = want_shapes
            .iter()
            .zip(&want)
            .filter(|(_, n)| !n.contains("running") && !n.contains("num_batches"))
            .map(|(s, _)| s.iter().product())
            .collect();
        assert_eq!(lens, want_lens);
        let mut bns = 0;
        block.for_each_batch_norm(&mut |_| bns += 1);
        assert_eq!(bns, if with_bn { 2 + usize::from(project) } else { 0 });
        assert!(block.has_relu());
        assert_eq!(
            block.shortcut().map(|(n, _)| n.to_string()),
            project.then(|| "downsample".into())
        );
        assert_eq!(
            block.main().child_names().len(),
            if with_bn { 5 } else { 3 }
        );
    }
}

#[test]
fn basic_block_describe() {
    let block = basic_block(16, 32, 2, true, 32, 1);
    let d = block.describe();
    assert!(
        d.starts_with("Residual(\n  (conv1): Conv2d(16, 32, kernel_size=(3, 3), stride=(2, 2)"),
        "{d}"
    );
    assert!(d.contains("\n  (-): ReLU()\n"), "{d}");
    assert!(d.contains("\n  (downsample): Sequential(\n    (0): Conv2d(16, 32, kernel_size=(1, 1), stride=(2, 2), bias=False) on 32x32\n"), "{d}");
    assert!(
        d.ends_with("\n  sum: ReLU(main(x) + downsample(x))\n)"),
        "{d}"
    );
    let d = basic_block(8, 8, 1, false, 6, 1).describe();
    assert!(d.ends_with("\n  sum: ReLU(main(x) + x)\n)"), "{d}");
}

/// A tiny ResNet (stem, an identity block, a projection block, global pool, fc) trains: the
/// model files build exactly this kind of stack. One SGD step on a fixed batch lowers the loss.
#[test]
fn small_resnet_forward_backward_runs() {
    let n = 4;
    let stem = conv(
        ConvShape {
            c: 1,
            h: 8,
            w: 8,
            o: 4,
            k: 3,
            s: 1,
            p: 1,
            bias: false,
        },
        3,
    );
    let mut lin = Linear::new(8, 3, true);
    lin.set_weight(&Lcg(4).vec_f32(24, 0.3, 0.0));
    let mut net = Sequential::named(vec![
        ("conv1", Box::new(stem) as Box<dyn Layer>),
        ("bn1", Box::new(bn(4, 64, 5))),
        ("", Box::new(Relu::new(4 * 64))),
        ("layer1", Box::new(basic_block(4, 4, 1, true, 8, 6))),
        ("layer2", Box::new(basic_block(4, 8, 2, true, 8, 7))),
        ("", Box::new(GlobalAvgPool::new(8, 4, 4).unwrap())),
        ("fc", Box::new(lin)),
    ])
    .unwrap();
    let x = Lcg(12).vec_f32(n * 64, 1.0, 0.5);
    let dy = Lcg(13).vec_f32(n * 3, 1.0, 0.0);
    let loss = |net: &mut Sequential| {
        let mut y = vec![0f32; n * 3];
        net.forward(ctx(Mode::Train), &x, &mut y, n).unwrap();
        y.iter()
            .zip(&dy)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum::<f64>()
    };
    let (_, _, _) = run(&mut net, &x, &dy, n, 2);
    let before = loss(&mut net);
    net.for_each_param(&mut |p, g| {
        for (a, &b) in p.iter_mut().zip(g) {
            *a -= 1e-3 * b;
        }
    });
    let after = loss(&mut net);
    assert!(after < before, "{before} -> {after}");
    let mut names = Vec::new();
    net.visit_state("", &mut |name, _, _| names.push(name.to_string()));
    assert!(names.contains(&"layer2.downsample.1.running_var".to_string()));
    assert!(names.contains(&"layer1.bn2.weight".to_string()));
}

// ---------------------------------------------------------------------------------------------
// Errors on bad geometry.

fn message<T>(r: bnlab::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_shape_error<T>(r: bnlab::Result<T>, want: &str) {
    match r {
        Ok(_) => panic!("expected an error containing '{want}'"),
        Err(Error::Shape(m)) => assert!(m.contains(want), "'{m}' lacks '{want}'"),
        Err(e) => panic!("not a shape error: {e}"),
    }
}

#[test]
fn conv_geometry_errors() {
    assert_shape_error(
        Conv2d::new(1, 4, 5, 1, 0, false, 3, 3),
        "kernel 5 larger than the padded input 3 + 2*0",
    );
    assert_shape_error(
        Conv2d::new(1, 4, 5, 1, 0, false, 3, 3),
        "Conv2d(1, 4, kernel_size=5",
    );
    assert_shape_error(Conv2d::new(1, 4, 3, 0, 1, false, 8, 8), "stride 0");
    assert_shape_error(Conv2d::new(1, 4, 0, 1, 0, false, 8, 8), "kernel size 0");
    assert_shape_error(Conv2d::new(0, 4, 3, 1, 1, false, 8, 8), "0 channels");
    assert_shape_error(Conv2d::new(1, 0, 3, 1, 1, false, 8, 8), "0 channels");
    assert_shape_error(
        Conv2d::new(1, 4, 1, 1, 0, false, 0, 8),
        "height: input of size 0",
    );
    assert_shape_error(
        Conv2d::new(1, 4, 3, 1, 1, false, 8, 0),
        "width: input of size 0",
    );
    assert_shape_error(
        Conv2d::new(1, 4, 3, 1, usize::MAX, false, 8, 8),
        "too large",
    );
    assert_shape_error(
        Conv2d::new(usize::MAX / 2, 4, 3, 1, 1, false, 8, 8),
        "weight too large",
    );
    assert_shape_error(
        Conv2d::new(1, 1, 1, 1, 0, false, usize::MAX / 2, 4),
        "input too large",
    );
    // Padding wider than the kernel is allowed, as in PyTorch.
    assert!(Conv2d::new(1, 1, 1, 1, 2, false, 3, 3).is_ok());
}

#[test]
fn pool_geometry_errors() {
    assert_shape_error(
        MaxPool2d::new(2, 3, 1, 2, 8, 8),
        "pool padding 2 above half the kernel 3",
    );
    assert_shape_error(
        AvgPool2d::new(2, 3, 1, 2, 8, 8, false),
        "pool padding 2 above half the kernel 3",
    );
    assert_shape_error(
        MaxPool2d::new(2, 4, 4, 0, 3, 3),
        "kernel 4 larger than the padded input 3 + 2*0",
    );
    assert_shape_error(AvgPool2d::new(2, 3, 1, 1, 0, 3, true), "input of size 0");
    assert_shape_error(MaxPool2d::new(0, 2, 2, 0, 4, 4), "0 channels");
    assert_shape_error(
        MaxPool2d::new(1, 2, 0, 0, 4, 4),
        "kernel and stride must be at least 1",
    );
    assert_shape_error(
        MaxPool2d::new(1, 1, 1, 0, 1 << 20, 1 << 20),
        "feature map too large",
    );
    assert_shape_error(GlobalAvgPool::new(4, 0, 3), "a map of size 0");
    assert_shape_error(GlobalAvgPool::new(usize::MAX, 2, 3), "input too large");
    assert_shape_error(Flatten::new(4, 3, 0), "a map of size 0");
}

#[test]
fn container_errors() {
    let lin = |i, o| Box::new(Linear::new(i, o, true)) as Box<dyn Layer>;
    assert_shape_error(
        Concat::new(vec![("b1", lin(100, 10)), ("b2", lin(784, 10))]),
        "branch 'b2' takes 784 inputs, branch 'b1' takes 100",
    );
    assert_shape_error(Concat::new(vec![]), "at least one branch");
    let m = message(Concat::new(vec![("a.b", lin(3, 3))]));
    assert!(m.contains("child name 'a.b' contains a dot"), "{m}");
    let m = message(Sequential::named(vec![
        ("fc", lin(3, 3)),
        ("fc", lin(3, 3)),
    ]));
    assert!(m.contains("child name 'fc' used twice"), "{m}");
    let m = message(Sequential::named(vec![("a.b", lin(3, 3))]));
    assert!(m.contains("child name 'a.b' contains a dot"), "{m}");
    // Unnamed children may repeat (they add no level).
    assert!(Sequential::named(vec![("", lin(3, 3)), ("", lin(3, 3))]).is_ok());
    assert_shape_error(
        Sequential::named(vec![("fc1", lin(3, 5)), ("fc2", lin(4, 2))]),
        "child 'fc2' (Linear(4, 2)) takes 4 inputs, child 'fc1' (Linear(3, 5)) gives 5",
    );
    assert_shape_error(Sequential::named(vec![]), "at least one child");
}

#[test]
fn residual_errors() {
    let lin = |i, o| Box::new(Linear::new(i, o, true)) as Box<dyn Layer>;
    let main = || Sequential::named(vec![("fc1", lin(6, 4)), ("fc2", lin(4, 3))]).unwrap();
    assert_shape_error(
        Residual::new(main(), None, true),
        "an identity shortcut needs a main path that keeps the size of its input, but it takes \
         6 inputs and gives 3",
    );
    assert_shape_error(
        Residual::new(main(), Some(("downsample".into(), lin(5, 3))), true),
        "shortcut 'downsample' takes 5 inputs, the main path takes 6",
    );
    assert_shape_error(
        Residual::new(main(), Some(("downsample".into(), lin(6, 2))), true),
        "shortcut 'downsample' gives 2 outputs, the main path gives 3",
    );
    let m = message(Residual::new(main(), Some(("fc1".into(), lin(6, 3))), true));
    assert!(m.contains("child name 'fc1' used twice"), "{m}");
    let m = message(Residual::new(
        main(),
        Some(("down.sample".into(), lin(6, 3))),
        true,
    ));
    assert!(m.contains("contains a dot"), "{m}");
    assert_shape_error(
        Residual::new(Sequential::new(vec![]), None, true),
        "the main path has no layers",
    );
    // Sequential::new does not check its chain; Residual does.
    assert_shape_error(
        Residual::new(Sequential::new(vec![lin(6, 4), lin(5, 6)]), None, true),
        "child '1' (Linear(5, 6)) takes 5 inputs, child '0' (Linear(6, 4)) gives 4",
    );
    assert!(Residual::new(main(), Some(("downsample".into(), lin(6, 3))), false).is_ok());
}

// ---------------------------------------------------------------------------------------------
// Speed.

/// `cargo test --release --test residual_layers -- --ignored --nocapture strided_conv_timing`:
/// the downsampling convolutions against the stride-1 convolution of the same output size and
/// multiply-adds, and against the products alone (a 1x1 convolution with `in*k*k` input
/// channels on the output map: the same matrix sizes, no lowering), batch 32. Prints, asserts
/// nothing.
#[test]
#[ignore]
fn strided_conv_timing() {
    let n = 32;
    let shape = |c, h, o, k, s, p| ConvShape {
        c,
        h,
        w: h,
        o,
        k,
        s,
        p,
        bias: false,
    };
    for (label, sh) in [
        ("3x3 s2 16->32 32x32", shape(16, 32, 32, 3, 2, 1)),
        ("3x3 s1 16->32 16x16", shape(16, 16, 32, 3, 1, 1)),
        ("products 144->32 16x16", shape(144, 16, 32, 1, 1, 0)),
        ("1x1 s2 16->32 32x32", shape(16, 32, 32, 1, 2, 0)),
        ("3x3 s2 32->64 16x16", shape(32, 16, 64, 3, 2, 1)),
        ("3x3 s1 32->64 8x8", shape(32, 8, 64, 3, 1, 1)),
        ("products 288->64 8x8", shape(288, 8, 64, 1, 1, 0)),
        ("1x1 s2 32->64 16x16", shape(32, 16, 64, 1, 2, 0)),
        ("3x3 s2 16->32 28x28", shape(16, 28, 32, 3, 2, 1)),
        ("3x3 s2 32->64 14x14", shape(32, 14, 64, 3, 2, 1)),
        ("products 288->64 7x7", shape(288, 7, 64, 1, 1, 0)),
    ] {
        let x = Lcg(1).vec_f32(n * sh.c * sh.h * sh.w, 1.0, 0.0);
        let mut l = conv(sh, 3);
        let dy = Lcg(2).vec_f32(n * l.out_size(), 1.0, 0.0);
        let mut y = vec![0f32; dy.len()];
        let mut dx = vec![0f32; x.len()];
        l.reserve(n);
        for threads in [1, 2] {
            let c = Ctx {
                mode: Mode::Train,
                threads,
            };
            let mut times = Vec::new();
            for _ in 0..30 {
                let t0 = std::time::Instant::now();
                l.forward(c, &x, &mut y, n).unwrap();
                let t1 = std::time::Instant::now();
                l.backward(c, &x, &y, &dy, Some(&mut dx), n);
                let t2 = std::time::Instant::now();
                times.push(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()));
            }
            // The best of each: the machine may be shared.
            let f = times.iter().map(|t| t.0).fold(f64::MAX, f64::min);
            let b = times.iter().map(|t| t.1).fold(f64::MAX, f64::min);
            let flops = 3.0 * 2.0 * (n * sh.o * sh.c * sh.k * sh.k * sh.oh() * sh.ow()) as f64;
            println!(
                "{label:23} {threads} thread(s): forward {:6.2} ms, backward {:6.2} ms ({:5.1} GFLOP/s)",
                f * 1e3,
                b * 1e3,
                flops / (f + b) / 1e9
            );
        }
    }
}

#[test]
fn residual_without_input_gradient_still_writes_parameter_gradients() {
    // As the first layer of a network (dx = None): main's and the projection's gradients are
    // the same as with dx.
    let (n, h) = (3, 8);
    let x = Lcg(42).vec_f32(n * 4 * h * h, 1.0, 0.0);
    let mut with = basic_block(4, 8, 2, true, h, 130);
    let dy = Lcg(43).vec_f32(n * with.out_size(), 1.0, 0.0);
    let (y, _, want) = run(&mut with, &x, &dy, n, 2);
    let mut without = basic_block(4, 8, 2, true, h, 130);
    without.reserve(n);
    let mut y2 = vec![0f32; y.len()];
    without.forward(ctx(Mode::Train), &x, &mut y2, n).unwrap();
    without.backward(ctx(Mode::Train), &x, &y2, &dy, None, n);
    let mut got = Vec::new();
    without.for_each_param(&mut |_, g| got.push(g.to_vec()));
    assert_eq!(got, want);
}
