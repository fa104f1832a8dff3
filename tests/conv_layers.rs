//! The convolutional layers: `Conv2d`, `MaxPool2d`, `AvgPool2d`, `GlobalAvgPool`, `Concat` and
//! named containers.
//!
//! - backward passes against central differences (loss accumulated in f64, as in
//!   tests/gradients.rs);
//! - convolution forward and backward against a direct f64 convolution written here, over
//!   shapes with non-square inputs, strides and padding, on one and two threads (results must
//!   be identical);
//! - forward and backward against PyTorch, from tests/data/conv_reference.safetensors
//!   (written by tests/data/make_conv_reference.py);
//! - `state_dict` names of an Inception block, as ../shared/peers/torch_inception.py names them;
//! - a timing of a 3x3 conv, 32 -> 32 channels, 28x28, batch 32 (`--ignored`).

mod common;

use bnlab::nn::{
    AvgPool2d, BatchNorm, Concat, Conv2d, Ctx, GlobalAvgPool, Layer, MaxPool2d, Mode, Relu,
    Sequential, TensorMut,
};
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

/// PyTorch's `ConvUnit` from torch_inception.py: conv (bias only without BN) -> [BN] -> ReLU,
/// children named `conv`, `bn`, `act`; `padding = k / 2`, stride 1.
fn conv_unit(cin: usize, cout: usize, k: usize, bn: bool, h: usize, w: usize) -> Box<dyn Layer> {
    let sh = ConvShape {
        c: cin,
        h,
        w,
        o: cout,
        k,
        s: 1,
        p: k / 2,
        bias: !bn,
    };
    let mut children: Vec<(&str, Box<dyn Layer>)> =
        vec![("conv", Box::new(conv(sh, (cin * 31 + cout * 7 + k) as u64)))];
    if bn {
        children.push(("bn", Box::new(BatchNorm::new(cout, h * w, 1e-5, true))));
    }
    children.push(("act", Box::new(Relu::new(cout * h * w))));
    Box::new(Sequential::named(children).unwrap())
}

/// torch_inception.py's `Inception` block on `h x w` maps.
#[allow(clippy::too_many_arguments)]
fn inception(
    cin: usize,
    c1: usize,
    c2r: usize,
    c2: usize,
    c3r: usize,
    c3: usize,
    c4: usize,
    bn: bool,
    h: usize,
    w: usize,
) -> Concat {
    let seq = |v: Vec<Box<dyn Layer>>| -> Box<dyn Layer> { Box::new(Sequential::new(v)) };
    // b4's pool is applied in `forward`, outside the module `b4`: an unnamed child.
    let b4 = Sequential::named(vec![
        (
            "",
            Box::new(AvgPool2d::new(cin, 3, 1, 1, h, w, true).unwrap()),
        ),
        ("", conv_unit(cin, c4, 1, bn, h, w)),
    ])
    .unwrap();
    Concat::new(vec![
        ("b1", conv_unit(cin, c1, 1, bn, h, w)),
        (
            "b2",
            seq(vec![
                conv_unit(cin, c2r, 1, bn, h, w),
                conv_unit(c2r, c2, 3, bn, h, w),
            ]),
        ),
        (
            "b3",
            seq(vec![
                conv_unit(cin, c3r, 1, bn, h, w),
                conv_unit(c3r, c3, 3, bn, h, w),
                conv_unit(c3, c3, 3, bn, h, w),
            ]),
        ),
        ("b4", Box::new(b4)),
    ])
    .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The direct convolution in f64: the definition, one multiply-add at a time.

struct Direct {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

#[allow(clippy::needless_range_loop)]
fn direct_conv(
    sh: ConvShape,
    n: usize,
    x: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    dy: &[f32],
) -> Direct {
    let oh = (sh.h + 2 * sh.p - sh.k) / sh.s + 1;
    let ow = (sh.w + 2 * sh.p - sh.k) / sh.s + 1;
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
                    let g = dy[yi(i, o, oy, ox)] as f64;
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
                                s += x[xv] as f64 * w[wv] as f64;
                                r.dx[xv] += w[wv] as f64 * g;
                                r.dw[wv] += x[xv] as f64 * g;
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

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (j, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
            "{what}[{j}]: got {g}, want {w}"
        );
    }
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

// ---------------------------------------------------------------------------------------------
// Conv2d.

#[test]
fn conv_gradients_k3_pad1_stride1_with_bias() {
    let sh = ConvShape {
        c: 3,
        h: 5,
        w: 6,
        o: 4,
        k: 3,
        s: 1,
        p: 1,
        bias: true,
    };
    let n = 3;
    let x = Lcg(11).vec_f32(n * sh.c * sh.h * sh.w, 1.0, 0.0);
    let params = check(&|| Box::new(conv(sh, 5)), x, n, Mode::Train, 1e-2, 2e-3);
    assert_eq!(params, 2);
}

#[test]
fn conv_gradients_k3_stride2_pad1_without_bias() {
    let sh = ConvShape {
        c: 2,
        h: 7,
        w: 6,
        o: 3,
        k: 3,
        s: 2,
        p: 1,
        bias: false,
    };
    let n = 2;
    let x = Lcg(12).vec_f32(n * sh.c * sh.h * sh.w, 1.0, 0.0);
    let params = check(&|| Box::new(conv(sh, 6)), x, n, Mode::Train, 1e-2, 2e-3);
    assert_eq!(params, 1);
}

#[test]
fn conv_gradients_k1() {
    let sh = ConvShape {
        c: 5,
        h: 4,
        w: 3,
        o: 3,
        k: 1,
        s: 1,
        p: 0,
        bias: true,
    };
    for n in [1, 4] {
        let x = Lcg(13).vec_f32(n * sh.c * sh.h * sh.w, 1.0, 0.0);
        check(
            &|| Box::new(conv(sh, 7)),
            x.clone(),
            n,
            Mode::Train,
            1e-2,
            2e-3,
        );
        check(&|| Box::new(conv(sh, 7)), x, n, Mode::Eval, 1e-2, 2e-3);
    }
}

#[test]
fn conv_matches_direct_convolution_on_one_and_two_threads() {
    let shapes = [
        // (c, h, w, o, k, s, p, bias)
        (3, 5, 7, 4, 3, 1, 1, true),
        (2, 8, 5, 3, 3, 2, 1, false),
        (4, 6, 6, 5, 1, 1, 0, true),
        (3, 6, 5, 4, 1, 2, 0, false),
        (3, 9, 7, 2, 5, 2, 2, true),
        (2, 7, 9, 3, 3, 2, 0, true),
        (1, 4, 4, 2, 4, 1, 0, false),
        (2, 3, 5, 3, 3, 3, 1, true),
        (16, 12, 10, 24, 3, 1, 1, false),
    ];
    for (si, &(c, h, w, o, k, s, p, bias)) in shapes.iter().enumerate() {
        let sh = ConvShape {
            c,
            h,
            w,
            o,
            k,
            s,
            p,
            bias,
        };
        for n in [1, 2, 5] {
            let mut rng = Lcg(100 + si as u64);
            let x = rng.vec_f32(n * c * h * w, 1.0, 0.0);
            let mut layers = [conv(sh, 40 + si as u64), conv(sh, 40 + si as u64)];
            let dy = rng.vec_f32(n * layers[0].out_size(), 1.0, 0.0);
            let want = direct_conv(
                sh,
                n,
                &x,
                &layers[0].weight.clone(),
                layers[0].bias.clone().as_deref(),
                &dy,
            );
            let what = format!("{sh:?} n={n}");
            let one = run(&mut layers[0], &x, &dy, n, 1);
            let two = run(&mut layers[1], &x, &dy, n, 2);
            assert_close(&one.0, &want.y, 1e-5, &format!("{what} y"));
            assert_close(&one.1, &want.dx, 1e-5, &format!("{what} dx"));
            assert_close(&one.2[0], &want.dw, 1e-5, &format!("{what} dw"));
            if bias {
                assert_close(&one.2[1], &want.db, 1e-5, &format!("{what} db"));
            }
            assert_eq!(one, two, "{what}: one and two threads differ");
        }
    }
}

#[test]
fn conv_describe_and_state() {
    let mut l = Conv2d::new(3, 8, 3, 2, 1, false, 28, 20).unwrap();
    assert_eq!((l.out_h, l.out_w), (14, 10));
    assert_eq!(l.in_size(), 3 * 28 * 20);
    assert_eq!(l.out_size(), 8 * 14 * 10);
    assert_eq!(
        l.describe(),
        "Conv2d(3, 8, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), bias=False) on 28x20"
    );
    let mut seen = Vec::new();
    l.visit_state("stem.conv.", &mut |name, shape, t| {
        assert!(matches!(t, TensorMut::F32(v) if v.len() == shape.iter().product::<usize>()));
        seen.push((name.to_string(), shape.to_vec()));
    });
    assert_eq!(
        seen,
        vec![("stem.conv.weight".to_string(), vec![8, 3, 3, 3])]
    );
}

// ---------------------------------------------------------------------------------------------
// Pools.

/// A shuffled grid of distinct values `spacing` apart: no ties in any window, and a nudge
/// smaller than `spacing / 2` changes no max-pool choice.
fn distinct(len: usize, spacing: f32, seed: u64) -> Vec<f32> {
    let mut v: Vec<f32> = (0..len)
        .map(|i| (i as f32 - len as f32 / 2.0) * spacing)
        .collect();
    let mut rng = Lcg(seed);
    for i in (1..len).rev() {
        let j = ((rng.next() + 1.0) / 2.0 * (i + 1) as f64) as usize;
        v.swap(i, j.min(i));
    }
    v
}

#[test]
fn max_pool_gradients() {
    for &(k, s, p, h, w) in &[
        (2, 2, 0, 6, 8),
        (2, 2, 0, 7, 5), // odd sizes: the last row/column is dropped
        (3, 2, 1, 7, 6), // overlapping windows with padding
    ] {
        let n = 2;
        let x = distinct(n * 3 * h * w, 0.05, 21);
        check(
            &|| Box::new(MaxPool2d::new(3, k, s, p, h, w).unwrap()),
            x,
            n,
            Mode::Train,
            1e-2,
            2e-3,
        );
    }
}

#[test]
fn max_pool_picks_first_maximum_on_ties() {
    let mut l = MaxPool2d::new(1, 2, 2, 0, 2, 4).unwrap();
    l.reserve(1);
    let x = [1.0, 3.0, 2.0, 2.0, 3.0, 0.0, 2.0, 2.0];
    let mut y = [0f32; 2];
    l.forward(ctx(Mode::Eval), &x, &mut y, 1).unwrap();
    assert_eq!(y, [3.0, 2.0]);
    let mut dx = [f32::NAN; 8];
    l.backward(ctx(Mode::Eval), &x, &y, &[1.0, 10.0], Some(&mut dx), 1);
    assert_eq!(dx, [0.0, 1.0, 10.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn avg_pool_gradients() {
    for &(k, s, p, h, w) in &[(3, 1, 1, 5, 6), (2, 2, 0, 6, 4), (3, 2, 1, 7, 5)] {
        let n = 2;
        let x = Lcg(22).vec_f32(n * 3 * h * w, 1.0, 0.0);
        check(
            &|| Box::new(AvgPool2d::new(3, k, s, p, h, w, true).unwrap()),
            x,
            n,
            Mode::Train,
            1e-2,
            2e-3,
        );
    }
}

#[test]
fn avg_pool_counts_padding() {
    // count_include_pad=True: a corner window of ones sees 4 of 9 taps inside, so 4/9.
    let mut l = AvgPool2d::new(1, 3, 1, 1, 3, 3, true).unwrap();
    l.reserve(1);
    let mut y = [0f32; 9];
    l.forward(ctx(Mode::Train), &[1.0; 9], &mut y, 1).unwrap();
    assert_eq!(
        y,
        [
            4.0 / 9.0,
            6.0 / 9.0,
            4.0 / 9.0,
            6.0 / 9.0,
            1.0,
            6.0 / 9.0,
            4.0 / 9.0,
            6.0 / 9.0,
            4.0 / 9.0
        ]
    );
}

#[test]
fn global_avg_pool_gradients() {
    let n = 3;
    let x = Lcg(23).vec_f32(n * 4 * 5 * 3, 1.0, 0.5);
    check(
        &|| Box::new(GlobalAvgPool::new(4, 5, 3).unwrap()),
        x.clone(),
        n,
        Mode::Train,
        1e-2,
        2e-3,
    );
    let mut l = GlobalAvgPool::new(4, 5, 3).unwrap();
    let mut y = vec![0f32; n * 4];
    l.forward(ctx(Mode::Eval), &x, &mut y, n).unwrap();
    for (j, v) in y.iter().enumerate() {
        let mean = x[j * 15..(j + 1) * 15]
            .iter()
            .map(|&a| a as f64)
            .sum::<f64>()
            / 15.0;
        assert!((*v as f64 - mean).abs() < 1e-6);
    }
}

// ---------------------------------------------------------------------------------------------
// Containers.

#[test]
fn concat_gradients() {
    let (c, h, w) = (3, 5, 4);
    let make = || -> Box<dyn Layer> {
        let b1 = conv(
            ConvShape {
                c,
                h,
                w,
                o: 2,
                k: 3,
                s: 1,
                p: 1,
                bias: true,
            },
            31,
        );
        let b2 = Sequential::named(vec![
            (
                "",
                Box::new(AvgPool2d::new(c, 3, 1, 1, h, w, true).unwrap()),
            ),
            (
                "conv",
                Box::new(conv(
                    ConvShape {
                        c,
                        h,
                        w,
                        o: 3,
                        k: 1,
                        s: 1,
                        p: 0,
                        bias: true,
                    },
                    32,
                )),
            ),
        ])
        .unwrap();
        Box::new(Concat::new(vec![("b1", Box::new(b1)), ("b2", Box::new(b2))]).unwrap())
    };
    let n = 2;
    let x = Lcg(24).vec_f32(n * c * h * w, 1.0, 0.0);
    assert_eq!(make().out_size(), 5 * h * w);
    let params = check(&make, x, n, Mode::Train, 1e-2, 2e-3);
    assert_eq!(params, 4);
}

#[test]
fn concat_output_is_branches_in_channel_order() {
    let (c, h, w, n) = (2, 3, 4, 3);
    let mk = |o, seed| {
        conv(
            ConvShape {
                c,
                h,
                w,
                o,
                k: 3,
                s: 1,
                p: 1,
                bias: true,
            },
            seed,
        )
    };
    let mut cat = Concat::new(vec![("a", Box::new(mk(2, 1))), ("b", Box::new(mk(3, 2)))]).unwrap();
    let (mut a, mut b) = (mk(2, 1), mk(3, 2));
    let x = Lcg(25).vec_f32(n * c * h * w, 1.0, 0.0);
    for l in [&mut cat as &mut dyn Layer, &mut a, &mut b] {
        l.reserve(n);
    }
    let mut y = vec![0f32; n * 5 * h * w];
    let (mut ya, mut yb) = (vec![0f32; n * 2 * h * w], vec![0f32; n * 3 * h * w]);
    cat.forward(ctx(Mode::Train), &x, &mut y, n).unwrap();
    a.forward(ctx(Mode::Train), &x, &mut ya, n).unwrap();
    b.forward(ctx(Mode::Train), &x, &mut yb, n).unwrap();
    let hw = h * w;
    for i in 0..n {
        assert_eq!(&y[i * 5 * hw..][..2 * hw], &ya[i * 2 * hw..][..2 * hw]);
        assert_eq!(
            &y[i * 5 * hw + 2 * hw..][..3 * hw],
            &yb[i * 3 * hw..][..3 * hw]
        );
    }
}

#[test]
fn named_conv_bn_relu_gradients() {
    // conv -> BatchNorm2d -> ReLU, as torch_inception.py's ConvUnit with BN. ReLU's kink: the
    // step is small so that few BN outputs cross 0 while the input moves.
    let (c, h, w, n) = (2, 4, 5, 3);
    let x = Lcg(26).vec_f32(n * c * h * w, 1.0, 0.3);
    let make = || -> Box<dyn Layer> {
        let mut u = conv_unit(c, 3, 3, true, h, w);
        // Non-trivial gamma and beta.
        u.for_each_batch_norm(&mut |bn| {
            bn.gamma = Some(vec![1.3, 0.7, 1.1]);
            bn.beta = Some(vec![0.2, -0.1, 0.4]);
        });
        u
    };
    let params = check(&make, x.clone(), n, Mode::Train, 2e-3, 1e-2);
    assert_eq!(params, 3);
    check(&make, x, n, Mode::Eval, 2e-3, 1e-2);
}

/// torch_inception.py's `Inception` (bn=True) registered as `a`, `state_dict` names written out
/// by hand from the Python: ConvUnit's `conv` and `bn` attributes (its `act` has no state),
/// `b2`/`b3` as `nn.Sequential` (indices), and `b4` a ConvUnit whose pool is outside it.
#[test]
fn inception_state_names_match_pytorch() {
    let bn_names = |p: &str| {
        [
            "weight",
            "bias",
            "running_mean",
            "running_var",
            "num_batches_tracked",
        ]
        .iter()
        .map(|s| format!("{p}.bn.{s}"))
        .collect::<Vec<_>>()
    };
    let unit = |p: &str, bn: bool| {
        let mut v = vec![format!("{p}.conv.weight")];
        if bn {
            v.extend(bn_names(p));
        } else {
            v.push(format!("{p}.conv.bias"));
        }
        v
    };
    for bn in [true, false] {
        let mut want = Vec::new();
        for p in [
            "a.b1", "a.b2.0", "a.b2.1", "a.b3.0", "a.b3.1", "a.b3.2", "a.b4",
        ] {
            want.extend(unit(p, bn));
        }
        // The block of torch_inception.py's `self.a` on 14x14 maps.
        let mut block = inception(32, 32, 24, 32, 16, 24, 16, bn, 14, 14);
        assert_eq!(block.out_size(), 104 * 14 * 14);
        let mut got = Vec::new();
        let mut shapes = Vec::new();
        block.visit_state("a.", &mut |name, shape, _| {
            got.push(name.to_string());
            shapes.push(shape.to_vec());
        });
        assert_eq!(got, want, "bn={bn}");
        // Spot-check shapes: [out, in, k, k] as PyTorch.
        assert_eq!(shapes[0], vec![32, 32, 1, 1]);
        let i = got.iter().position(|s| s == "a.b3.2.conv.weight").unwrap();
        assert_eq!(shapes[i], vec![24, 24, 3, 3]);
        let i = got.iter().position(|s| s == "a.b4.conv.weight").unwrap();
        assert_eq!(shapes[i], vec![16, 32, 1, 1]);
        // One parameter per conv weight, bias / BN gamma and beta.
        let mut params = 0;
        block.for_each_param(&mut |_, _| params += 1);
        assert_eq!(params, 7 * 2 + if bn { 7 } else { 0 });
    }
}

#[test]
fn inception_block_runs_and_is_thread_independent() {
    let (h, w, n) = (6, 5, 3);
    let x = Lcg(27).vec_f32(n * 8 * h * w, 1.0, 0.0);
    let mut results = Vec::new();
    for threads in [1, 2] {
        let mut block = inception(8, 4, 3, 4, 2, 3, 2, true, h, w);
        let dy = Lcg(28).vec_f32(n * block.out_size(), 1.0, 0.0);
        let r = run(&mut block, &x, &dy, n, threads);
        assert!(r.0.iter().chain(&r.1).all(|v| v.is_finite()));
        results.push(r);
    }
    assert_eq!(results[0], results[1]);
}

// ---------------------------------------------------------------------------------------------
// PyTorch reference.

fn reference() -> safetensors::SafeTensors<'static> {
    let bytes = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/conv_reference.safetensors"),
    )
    .unwrap();
    safetensors::SafeTensors::deserialize(Box::leak(bytes.into_boxed_slice())).unwrap()
}

fn tensor(r: &safetensors::SafeTensors<'_>, name: &str) -> (Vec<f32>, Vec<usize>) {
    let t = r.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (v, t.shape().to_vec())
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&a| a as f64).collect()
}

#[test]
fn conv_matches_pytorch() {
    let r = reference();
    for (name, k, s, p) in [
        ("conv_s2", 3, 2, 1),
        ("conv_s1", 3, 1, 1),
        ("conv_1x1", 1, 1, 0),
    ] {
        let (x, xs) = tensor(&r, &format!("{name}.x"));
        let (w, ws) = tensor(&r, &format!("{name}.weight"));
        let bias = r.tensor(&format!("{name}.bias")).is_ok();
        let (n, c, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
        assert_eq!((ws[1], ws[2], ws[3]), (c, k, k));
        let mut l = Conv2d::new(c, ws[0], k, s, p, bias, h, wd).unwrap();
        l.set_weight(&w);
        if bias {
            l.bias = Some(tensor(&r, &format!("{name}.bias")).0);
        }
        let (dy, _) = tensor(&r, &format!("{name}.dy"));
        let (y, dx, grads) = run(&mut l, &x, &dy, n, 2);
        let tol = 2e-5;
        assert_close(&y, &f64s(&tensor(&r, &format!("{name}.y")).0), tol, name);
        assert_close(&dx, &f64s(&tensor(&r, &format!("{name}.dx")).0), tol, name);
        let dw = tensor(&r, &format!("{name}.dweight")).0;
        assert_close(&grads[0], &f64s(&dw), tol, name);
        if bias {
            let db = tensor(&r, &format!("{name}.dbias")).0;
            assert_close(&grads[1], &f64s(&db), tol, name);
        }
    }
}

#[test]
fn pools_match_pytorch() {
    let r = reference();
    for name in ["maxpool", "avgpool"] {
        let (x, xs) = tensor(&r, &format!("{name}.x"));
        let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
        let mut l: Box<dyn Layer> = if name == "maxpool" {
            Box::new(MaxPool2d::new(c, 2, 2, 0, h, w).unwrap())
        } else {
            Box::new(AvgPool2d::new(c, 3, 1, 1, h, w, true).unwrap())
        };
        let (dy, _) = tensor(&r, &format!("{name}.dy"));
        let (y, dx, _) = run(l.as_mut(), &x, &dy, n, 1);
        assert_close(&y, &f64s(&tensor(&r, &format!("{name}.y")).0), 1e-6, name);
        assert_close(&dx, &f64s(&tensor(&r, &format!("{name}.dx")).0), 1e-6, name);
    }
}

// ---------------------------------------------------------------------------------------------
// Speed.

/// `cargo test --release --test conv_layers -- --ignored --nocapture conv_timing`
#[test]
#[ignore]
fn conv_timing() {
    let sh = ConvShape {
        c: 32,
        h: 28,
        w: 28,
        o: 32,
        k: 3,
        s: 1,
        p: 1,
        bias: false,
    };
    let n = 32;
    let x = Lcg(1).vec_f32(n * 32 * 28 * 28, 1.0, 0.0);
    let dy = Lcg(2).vec_f32(n * 32 * 28 * 28, 1.0, 0.0);
    let mut y = vec![0f32; x.len()];
    let mut dx = vec![0f32; x.len()];
    for threads in [1, 2] {
        let mut l = conv(sh, 3);
        l.reserve(n);
        let c = Ctx {
            mode: Mode::Train,
            threads,
        };
        let mut times = Vec::new();
        for _ in 0..12 {
            let t0 = std::time::Instant::now();
            l.forward(c, &x, &mut y, n).unwrap();
            let t1 = std::time::Instant::now();
            l.backward(c, &x, &y, &dy, Some(&mut dx), n);
            let t2 = std::time::Instant::now();
            times.push(((t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64()));
        }
        times.sort_by(|a, b| (a.0 + a.1).total_cmp(&(b.0 + b.1)));
        let (f, b) = times[times.len() / 2];
        let flops = 3.0 * 2.0 * (n * 32 * 288 * 784) as f64;
        println!(
            "conv 3x3 32->32 28x28 batch 32, {threads} thread(s): forward {:.1} ms, backward {:.1} ms, total {:.1} ms ({:.1} GFLOP/s)",
            f * 1e3,
            b * 1e3,
            (f + b) * 1e3,
            flops / (f + b) / 1e9
        );
    }
}
