//! The layers used as a Rust program using the crate would: no `reserve`, calls in odd orders
//! (backward before forward, batches growing and shrinking, a failed forward pass, `reserve`
//! between forward and backward), slices of the wrong length. Nothing may panic; every result
//! must equal that of a layer sized up front and used in the usual order.

use bnlab::nn::{
    AvgPool2d, BatchNorm, Concat, Conv2d, Ctx, Dropout, Flatten, GlobalAvgPool, Layer, Linear,
    MaxPool2d, Mode, Relu, Residual, Sequential, Sigmoid, Tanh,
};
use bnlab::Error;

/// Deterministic values in [-1, 1) (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
    }
    fn vec(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.next()).collect()
    }
}

fn ctx(mode: Mode) -> Ctx {
    Ctx { mode, threads: 1 }
}

/// The 20-line program of the issue: a BatchNorm built, a batch forwarded in training mode,
/// backward, the gradients read, then inference. No `reserve` anywhere.
#[test]
fn batch_norm_as_a_user_writes_it() {
    let (n, c) = (8, 4);
    let mut bn = BatchNorm::new(c, 1, 1e-5, true);
    let x: Vec<f32> = (0..n * c)
        .map(|i| (i as f32 * 0.37).sin() * 3.0 + 1.0)
        .collect();
    let mut y = vec![0.0; n * c];
    bn.forward(ctx(Mode::Train), &x, &mut y, n).unwrap();
    let dy: Vec<f32> = (0..n * c).map(|i| (i as f32 * 0.11).cos()).collect();
    let mut dx = vec![0.0; n * c];
    bn.backward(ctx(Mode::Train), &x, &y, &dy, Some(&mut dx), n);
    let grad_gamma = bn.grad_gamma().unwrap().to_vec();
    let grad_beta = bn.grad_beta().unwrap().to_vec();
    bn.forward(ctx(Mode::Eval), &x, &mut y, n).unwrap();

    // Training output: zero mean and unit variance per feature (gamma 1, beta 0).
    let mut y_train = vec![0.0; n * c];
    let mut fresh = BatchNorm::new(c, 1, 1e-5, true);
    fresh
        .forward(ctx(Mode::Train), &x, &mut y_train, n)
        .unwrap();
    for j in 0..c {
        let col: Vec<f64> = (0..n).map(|i| y_train[i * c + j] as f64).collect();
        let mean = col.iter().sum::<f64>() / n as f64;
        let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 1e-5, "feature {j}: mean {mean}");
        assert!((var - 1.0).abs() < 1e-3, "feature {j}: variance {var}");
        // d beta = sum dy, d gamma = sum dy * xhat; dx sums to zero over the batch.
        let sum_dy: f64 = (0..n).map(|i| dy[i * c + j] as f64).sum();
        let sum_dy_xhat: f64 = (0..n)
            .map(|i| (dy[i * c + j] * y_train[i * c + j]) as f64)
            .sum();
        assert!((grad_beta[j] as f64 - sum_dy).abs() < 1e-5);
        assert!((grad_gamma[j] as f64 - sum_dy_xhat).abs() < 1e-4);
        let sum_dx: f64 = (0..n).map(|i| dx[i * c + j] as f64).sum();
        assert!(sum_dx.abs() < 1e-4, "feature {j}: sum of dx {sum_dx}");
    }
    // One training step moved the running statistics by momentum 0.1 from (0, 1).
    assert_eq!(bn.num_batches_tracked, 1);
    for j in 0..c {
        let col: Vec<f64> = (0..n).map(|i| x[i * c + j] as f64).collect();
        let mean = col.iter().sum::<f64>() / n as f64;
        let unbiased = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
        assert!((bn.running_mean[j] as f64 - 0.1 * mean).abs() < 1e-5);
        assert!((bn.running_var[j] as f64 - (0.9 + 0.1 * unbiased)).abs() < 1e-4);
        // Eval normalizes with them.
        let inv = 1.0 / (bn.running_var[j] as f64 + 1e-5).sqrt();
        for i in 0..n {
            let want = (x[i * c + j] as f64 - bn.running_mean[j] as f64) * inv;
            assert!((y[i * c + j] as f64 - want).abs() < 1e-4);
        }
    }
    // Eval leaves the running statistics alone.
    assert_eq!(bn.num_batches_tracked, 1);
}

/// A layer kind: its name and a constructor (a fresh layer per call).
type Kind = (&'static str, Box<dyn Fn() -> Box<dyn Layer>>);

fn kind(name: &'static str, make: impl Fn() -> Box<dyn Layer> + 'static) -> Kind {
    (name, Box::new(make))
}

/// Every layer kind, leaves and containers.
fn layer_kinds() -> Vec<Kind> {
    vec![
        kind("Linear", || Box::new(lin(12, 5))),
        kind("Linear(sparse input)", || {
            let mut l = lin(12, 5);
            l.sparse_input = true;
            Box::new(l)
        }),
        kind("BatchNorm1d", || {
            Box::new(BatchNorm::new(12, 1, 1e-5, true))
        }),
        kind("BatchNorm2d", || {
            Box::new(BatchNorm::new(3, 16, 1e-5, true))
        }),
        kind("BatchNorm1d(affine=False)", || {
            Box::new(BatchNorm::new(12, 1, 1e-5, false))
        }),
        kind("Sigmoid", || Box::new(Sigmoid::new(12))),
        kind("ReLU", || Box::new(Relu::new(12))),
        kind("Tanh", || Box::new(Tanh::new(12))),
        kind("Dropout", || Box::new(Dropout::new(12, 0.5, 7))),
        kind("Flatten", || Box::new(Flatten::new(3, 4, 4).unwrap())),
        kind("Conv2d 3x3", || Box::new(conv(3, 4, 3, 1, 1))),
        kind("Conv2d 3x3/2", || Box::new(conv(3, 4, 3, 2, 1))),
        kind("Conv2d 1x1", || Box::new(conv(3, 4, 1, 1, 0))),
        kind("Conv2d 2x2", || Box::new(conv(3, 2, 2, 1, 0))),
        kind("MaxPool2d", || {
            Box::new(MaxPool2d::new(3, 2, 2, 0, 4, 4).unwrap())
        }),
        kind("AvgPool2d", || {
            Box::new(AvgPool2d::new(3, 3, 1, 1, 4, 4, false).unwrap())
        }),
        kind("GlobalAvgPool", || {
            Box::new(GlobalAvgPool::new(3, 4, 4).unwrap())
        }),
        kind("Sequential", || {
            let layers: Vec<Box<dyn Layer>> = vec![
                Box::new(lin(12, 6)),
                Box::new(BatchNorm::new(6, 1, 1e-5, true)),
                Box::new(Relu::new(6)),
                Box::new(Dropout::new(6, 0.3, 1)),
                Box::new(lin(6, 4)),
            ];
            Box::new(Sequential::new(layers))
        }),
        kind("Concat", || {
            let a: Box<dyn Layer> = Box::new(conv(3, 2, 1, 1, 0));
            let chain: Vec<Box<dyn Layer>> = vec![
                Box::new(MaxPool2d::new(3, 3, 1, 1, 4, 4).unwrap()),
                Box::new(conv(3, 2, 3, 1, 1)),
                Box::new(BatchNorm::new(2, 16, 1e-5, true)),
            ];
            let b: Box<dyn Layer> = Box::new(Sequential::new(chain));
            Box::new(Concat::new(vec![("a", a), ("b", b)]).unwrap())
        }),
        kind("Residual (identity)", || {
            let c: Box<dyn Layer> = Box::new(conv(3, 3, 3, 1, 1));
            let b: Box<dyn Layer> = Box::new(BatchNorm::new(3, 16, 1e-5, true));
            let main = Sequential::named(vec![("conv1", c), ("bn1", b)]).unwrap();
            Box::new(Residual::new(main, None, true).unwrap())
        }),
        kind("Residual (projection)", || {
            let c: Box<dyn Layer> = Box::new(conv(3, 4, 3, 2, 1));
            let b: Box<dyn Layer> = Box::new(BatchNorm::new(4, 4, 1e-5, true));
            let main = Sequential::named(vec![("conv1", c), ("bn1", b)]).unwrap();
            let short: Box<dyn Layer> = Box::new(conv(3, 4, 1, 2, 0));
            Box::new(Residual::new(main, Some(("downsample".into(), short)), true).unwrap())
        }),
    ]
}

/// A Linear with fixed pseudo-random weights.
fn lin(i: usize, o: usize) -> Linear {
    let mut l = Linear::new(i, o, true);
    let mut r = Rng(0x5eed + (i * 31 + o) as u64);
    l.weight_t = r.vec(i * o);
    l.bias = Some(r.vec(o));
    l
}

/// A Conv2d on 4x4 maps with fixed pseudo-random weights.
fn conv(i: usize, o: usize, k: usize, s: usize, p: usize) -> Conv2d {
    let mut c = Conv2d::new(i, o, k, s, p, true, 4, 4).unwrap();
    let mut r = Rng(0xc0ffee + (i * 131 + o * 17 + k * 7 + s) as u64);
    let w = r.vec(c.weight.len());
    c.set_weight(&w);
    c.bias = Some(r.vec(o));
    c
}

/// The input of a layer kind: about two thirds zeros (so that the sparse Linear takes its
/// sparse path), the rest spread around 0.5.
fn input(layer: &dyn Layer, n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n * layer.in_size())
        .map(|_| {
            if r.next() < 0.3 {
                0.0
            } else {
                r.next() * 2.0 + 0.5
            }
        })
        .collect()
}

/// What a forward and backward pass left: the output, dx and every parameter gradient.
#[derive(Debug, PartialEq)]
struct Pass {
    y: Vec<f32>,
    dx: Vec<f32>,
    grads: Vec<Vec<f32>>,
}

fn grads_of(layer: &mut dyn Layer) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    layer.for_each_param(&mut |_, g| out.push(g.to_vec()));
    out
}

/// Forward then backward on a batch of `n` (inputs from `seed`) in `mode`.
fn pass(layer: &mut dyn Layer, n: usize, seed: u64, mode: Mode) -> Pass {
    let x = input(layer, n, seed);
    let mut y = vec![f32::NAN; n * layer.out_size()];
    layer.forward(ctx(mode), &x, &mut y, n).unwrap();
    let dy = Rng(seed ^ 0xd1).vec(y.len());
    let mut dx = vec![f32::NAN; x.len()];
    layer.backward(ctx(mode), &x, &y, &dy, Some(&mut dx), n);
    Pass {
        y,
        dx,
        grads: grads_of(layer),
    }
}

/// Without `reserve`, with the batch growing from pass to pass, every layer gives the results
/// of a twin sized up front for the largest batch.
#[test]
fn every_layer_works_without_reserve_and_with_growing_batches() {
    for (name, make) in layer_kinds() {
        let mut lazy = make();
        let mut sized = make();
        sized.reserve(16);
        for (k, (n, mode)) in [
            (2, Mode::Train),
            (5, Mode::Train),
            (3, Mode::Eval),
            (16, Mode::Train),
            (9, Mode::Eval),
        ]
        .into_iter()
        .enumerate()
        {
            let seed = 100 + k as u64;
            let got = pass(lazy.as_mut(), n, seed, mode);
            let want = pass(sized.as_mut(), n, seed, mode);
            assert_eq!(got, want, "{name}: batch {n} in {mode:?}");
            assert!(
                got.y.iter().chain(&got.dx).all(|v| v.is_finite()),
                "{name}: batch {n}: non-finite output or dx"
            );
        }
    }
}

/// The layers that cache something in `forward` have nothing to differentiate before it: zero
/// gradients and zero dx. The stateless ones differentiate at the `x` and `y` given. Either
/// way, no panic, and the next forward/backward pair is exact.
#[test]
fn backward_before_any_forward() {
    let caching = [
        "BatchNorm1d",
        "BatchNorm2d",
        "BatchNorm1d(affine=False)",
        "Dropout",
        "MaxPool2d",
        "Sequential",
        "Concat",
        "Residual (identity)",
        "Residual (projection)",
    ];
    for (name, make) in layer_kinds() {
        let n = 4;
        let mut layer = make();
        let x = input(layer.as_ref(), n, 1);
        let y = vec![0.25; n * layer.out_size()];
        let dy = Rng(2).vec(y.len());
        let mut dx = vec![f32::NAN; x.len()];
        layer.backward(ctx(Mode::Train), &x, &y, &dy, Some(&mut dx), n);
        assert!(dx.iter().all(|v| v.is_finite()), "{name}: dx not written");
        if caching.contains(&name) {
            assert!(dx.iter().all(|&v| v == 0.0), "{name}: dx not zero");
            for g in grads_of(layer.as_mut()) {
                assert!(g.iter().all(|&v| v == 0.0), "{name}: gradient not zero");
            }
        }
        // Without dx too.
        layer.backward(ctx(Mode::Train), &x, &y, &dy, None, n);
        // Then the usual order gives the usual results.
        let got = pass(layer.as_mut(), n, 3, Mode::Train);
        let want = pass(make().as_mut(), n, 3, Mode::Train);
        assert_eq!(got, want, "{name}: after an early backward");
    }
}

/// A backward pass with another batch size than the last forward's has nothing to
/// differentiate in a caching layer; a stateless one computes at what it is given. No panic
/// either way, with a smaller or a larger batch.
#[test]
fn backward_with_another_batch_size() {
    for (name, make) in layer_kinds() {
        let mut layer = make();
        pass(layer.as_mut(), 4, 5, Mode::Train);
        for n in [2, 7] {
            let x = input(layer.as_ref(), n, 6);
            let y = vec![0.5; n * layer.out_size()];
            let dy = Rng(7).vec(y.len());
            let mut dx = vec![f32::NAN; x.len()];
            layer.backward(ctx(Mode::Train), &x, &y, &dy, Some(&mut dx), n);
            assert!(dx.iter().all(|v| v.is_finite()), "{name}: batch {n}");
        }
    }
}

/// `reserve` between forward and backward (growing the buffers) keeps what the forward pass
/// cached; `reserve` with a smaller batch shrinks nothing.
#[test]
fn reserve_between_forward_and_backward_keeps_the_cache() {
    for (name, make) in layer_kinds() {
        let n = 6;
        let mut layer = make();
        let mut twin = make();
        let x = input(layer.as_ref(), n, 11);
        let mut y = vec![0.0; n * layer.out_size()];
        layer.forward(ctx(Mode::Train), &x, &mut y, n).unwrap();
        layer.reserve(32);
        layer.reserve(1);
        let dy = Rng(12).vec(y.len());
        let mut dx = vec![0.0; x.len()];
        layer.backward(ctx(Mode::Train), &x, &y, &dy, Some(&mut dx), n);
        let got = Pass {
            y,
            dx,
            grads: grads_of(layer.as_mut()),
        };
        let want = pass(twin.as_mut(), n, 11, Mode::Train);
        // `pass` draws dy from seed ^ 0xd1; redo the twin's backward with this dy.
        let mut dx2 = vec![0.0; x.len()];
        twin.backward(ctx(Mode::Train), &x, &want.y, &dy, Some(&mut dx2), n);
        let want = Pass {
            y: want.y,
            dx: dx2,
            grads: grads_of(twin.as_mut()),
        };
        assert_eq!(got, want, "{name}");
        // The larger batch now runs without growing anything, and like the twin (which has
        // the same history, so the same dropout generator state).
        let got = pass(layer.as_mut(), 32, 13, Mode::Train);
        let want = pass(twin.as_mut(), 32, 13, Mode::Train);
        assert_eq!(got, want, "{name}: batch 32");
    }
}

/// Slices too short for the batch are an `Error::Shape` from `forward`, naming the layer;
/// afterwards `backward` has nothing to differentiate (for the caching layers) and the layer
/// still works.
#[test]
fn short_slices_are_errors() {
    for (name, make) in layer_kinds() {
        let n = 4;
        let mut layer = make();
        let (i, o) = (layer.in_size(), layer.out_size());
        let x = input(layer.as_ref(), n, 21);
        // (input length, output length): the input short, the output short, no input at all.
        for (xl, yl) in [(n * i - 1, n * o), (n * i, n * o - 1), (0, n * o)] {
            let mut y = vec![0.0; yl];
            match layer.forward(ctx(Mode::Train), &x[..xl], &mut y, n) {
                Err(Error::Shape(msg)) => assert!(msg.contains("a batch of 4"), "{name}: {msg}"),
                other => panic!("{name}: expected a shape error, got {other:?}"),
            }
        }
        let got = pass(layer.as_mut(), n, 22, Mode::Train);
        let want = pass(make().as_mut(), n, 22, Mode::Train);
        assert_eq!(got, want, "{name}: after the errors");
    }
    // A batch so large that its size overflows is an error too, not a panic.
    let mut l = Linear::new(4, 2, true);
    let mut y = [0.0; 2];
    assert!(matches!(
        l.forward(ctx(Mode::Eval), &[0.0; 4], &mut y, usize::MAX),
        Err(Error::Shape(_))
    ));
}

/// A failed forward pass leaves nothing for backward: gradients and dx zero, no panic.
#[test]
fn backward_after_a_failed_forward() {
    let mut bn = BatchNorm::new(3, 1, 1e-5, true);
    let mut y = vec![0.0; 6];
    pass(&mut bn, 2, 31, Mode::Train);
    assert!(bn.grad_beta().unwrap().iter().any(|&g| g != 0.0));
    // A batch of one in training mode: BN's statistics are undefined.
    let x = [1.0, 2.0, 3.0];
    assert!(matches!(
        bn.forward(ctx(Mode::Train), &x, &mut y, 1),
        Err(Error::BatchTooSmall { .. })
    ));
    let mut dx = [f32::NAN; 3];
    bn.backward(ctx(Mode::Train), &x, &y, &[1.0; 3], Some(&mut dx), 1);
    assert_eq!(dx, [0.0; 3]);
    assert_eq!(bn.grad_beta().unwrap(), &[0.0; 3]);
    assert_eq!(bn.grad_gamma().unwrap(), &[0.0; 3]);
    // In inference a single example is fine.
    bn.forward(ctx(Mode::Eval), &x, &mut y, 1).unwrap();

    // A Sequential whose children do not chain fails in forward, naming the child.
    let broken: Vec<Box<dyn Layer>> = vec![Box::new(lin(4, 3)), Box::new(lin(5, 2))];
    let mut s = Sequential::new(broken);
    let mut y = vec![0.0; 2 * 2];
    match s.forward(ctx(Mode::Train), &[0.5; 8], &mut y, 2) {
        Err(Error::Shape(msg)) => assert!(msg.contains("Linear(5, 2)"), "{msg}"),
        other => panic!("expected a shape error, got {other:?}"),
    }
    let mut dx = [f32::NAN; 8];
    s.backward(ctx(Mode::Train), &[0.5; 8], &y, &[1.0; 4], Some(&mut dx), 2);
    assert_eq!(dx, [0.0; 8]);
}

/// `zero_grad` zeroes every parameter gradient of a tree; the accessors read them.
#[test]
fn zero_grad_and_gradient_accessors() {
    let (_, make) = layer_kinds()
        .into_iter()
        .find(|(n, _)| *n == "Residual (projection)")
        .unwrap();
    let mut layer = make();
    pass(layer.as_mut(), 4, 41, Mode::Train);
    assert!(grads_of(layer.as_mut()).iter().flatten().any(|&g| g != 0.0));
    layer.zero_grad();
    assert!(grads_of(layer.as_mut()).iter().flatten().all(|&g| g == 0.0));

    let mut l = lin(12, 5);
    pass(&mut l, 3, 42, Mode::Train);
    let mut all = grads_of(&mut l);
    assert_eq!(l.grad_weight_t(), &all.remove(0)[..]);
    assert_eq!(l.grad_bias().unwrap(), &all.remove(0)[..]);
    let mut c = conv(3, 4, 3, 1, 1);
    pass(&mut c, 3, 43, Mode::Train);
    let mut all = grads_of(&mut c);
    assert_eq!(c.grad_weight(), &all.remove(0)[..]);
    assert_eq!(c.grad_bias().unwrap(), &all.remove(0)[..]);
    let mut bn = BatchNorm::new(4, 1, 1e-5, false);
    pass(&mut bn, 3, 44, Mode::Train);
    assert!(bn.grad_gamma().is_none() && bn.grad_beta().is_none());
}
