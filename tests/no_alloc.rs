//! The training step allocates nothing: every buffer is sized once per network. Checked with a
//! counting global allocator over many steps after a warm-up, on one, two and three threads.

mod common;

use bnlab::data::load_mnist_dir;
use bnlab::network::Network;
use bnlab::nn::{
    BatchNorm, Conv2d, ConvAlgo, Ctx, GlobalAvgPool, GroupNorm, Layer, Linear, Mode, Relu,
    Residual, Sequential,
};
use bnlab::optim::Schedule;
use bnlab::train::{Order, TrainConfig, Trainer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is global: the checks of this file take turns, or one would count the other's
/// allocations. This file has no test harness (`harness = false` in Cargo.toml): `main` runs
/// the checks one after another on one thread, so no harness thread allocates (reporting a
/// finished test) while a step is being counted.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Train `preset` for `warmup` steps, then count the allocations of `steps` more, on 1 and 2
/// threads; SGD with momentum, weight decay and an exponential schedule, shuffled batches.
fn assert_steps_allocate_nothing(
    presets: &[&str],
    batch: usize,
    lr: f64,
    warmup: usize,
    steps: usize,
    conv: ConvAlgo,
) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dir) = common::mnist_or_skip() else {
        return;
    };
    // The inception-mini presets take 28x28 grey images: MNIST's shape.
    let data = load_mnist_dir(&dir).unwrap();
    for &preset in presets {
        for threads in [1, 2, 3] {
            let cfg = TrainConfig {
                steps: warmup + steps,
                batch_size: batch,
                lr,
                momentum: 0.9,
                weight_decay: 1e-4,
                schedule: Schedule::Exponential {
                    every: 100,
                    gamma: 0.9,
                },
                seed: 3,
                order: Order::Shuffle,
                eval_every: 0,
                threads,
                augment: bnlab::train::Augment::None,
                bn: Default::default(),
            };
            let spec = bnlab::model::preset(preset).unwrap();
            let input = bnlab::model::resolve_input(&spec, Some(&[1, 28, 28])).unwrap();
            let mut net = Network::build(&spec, &input, 3, batch, threads).unwrap();
            net.set_conv_algo(conv);
            let mut t = Trainer::new(cfg, data.train.len(), data.train.features());
            for _ in 0..warmup {
                t.step(&mut net, &data.train).unwrap();
            }
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            for _ in 0..steps {
                t.step(&mut net, &data.train).unwrap();
            }
            let after = ALLOCATIONS.load(Ordering::SeqCst);
            assert_eq!(
                after - before,
                0,
                "{preset:?} ({}), {threads} threads: allocations in steps",
                conv.name()
            );
        }
    }
}

fn training_steps_do_not_allocate() {
    // 1,200 steps cross an epoch boundary (1,000 batches of 60), so reshuffling is covered too.
    let direct = ConvAlgo::Direct;
    assert_steps_allocate_nothing(&["mlp-fig1", "mlp-fig1-bn"], 60, 0.1, 20, 1200, direct);
}

/// The convolutional presets too: im2col workspaces, transposed gradients and all products
/// (our own kernels; no `gemm`-crate call, which would allocate packing buffers) are sized at
/// `reserve`. Both the BN net and the no-BN net with dropout, with the direct products and
/// with Winograd's (its transformed filters and tiles are sized by `set_algo`); ResNet-20 on
/// Winograd's.
fn convolutional_training_steps_do_not_allocate() {
    let presets = ["inception-mini-bn", "inception-mini"];
    for conv in [ConvAlgo::Direct, ConvAlgo::Winograd] {
        assert_steps_allocate_nothing(&presets, 32, 0.05, 3, 25, conv);
    }
    assert_steps_allocate_nothing(&["resnet20-bn"], 16, 0.05, 2, 4, ConvAlgo::Winograd);
}

/// A ResNet-like stack built from `Residual` blocks (an identity block, then a projection block
/// with stride 2, as ResNet-20's stages begin): forward and backward allocate nothing once
/// reserved, on 1 and 2 threads. No data needed.
fn residual_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = common::Lcg(5);
    let mut conv = |cin, cout, k, s, p, hw| -> Box<dyn Layer> {
        let mut c = Conv2d::new(cin, cout, k, s, p, false, hw, hw).unwrap();
        let w = rng.vec_f32(c.weight.len(), 0.3, 0.0);
        c.set_weight(&w);
        Box::new(c)
    };
    let bn = |c, hw| -> Box<dyn Layer> { Box::new(BatchNorm::new(c, hw, 1e-5, true)) };
    let identity = Sequential::named(vec![
        ("conv1", conv(8, 8, 3, 1, 1, 16)),
        ("bn1", bn(8, 256)),
        ("", Box::new(Relu::new(8 * 256))),
        ("conv2", conv(8, 8, 3, 1, 1, 16)),
        ("bn2", bn(8, 256)),
    ])
    .unwrap();
    let project = Sequential::named(vec![
        ("conv1", conv(8, 16, 3, 2, 1, 16)),
        ("bn1", bn(16, 64)),
        ("", Box::new(Relu::new(16 * 64))),
        ("conv2", conv(16, 16, 3, 1, 1, 8)),
        ("bn2", bn(16, 64)),
    ])
    .unwrap();
    let downsample: Box<dyn Layer> =
        Box::new(Sequential::new(vec![conv(8, 16, 1, 2, 0, 16), bn(16, 64)]));
    let mut net = Sequential::named(vec![
        ("conv1", conv(3, 8, 3, 1, 1, 16)),
        ("bn1", bn(8, 256)),
        ("", Box::new(Relu::new(8 * 256))),
        (
            "layer1",
            Box::new(Residual::new(identity, None, true).unwrap()),
        ),
        (
            "layer2",
            Box::new(
                Residual::new(project, Some(("downsample".into(), downsample)), true).unwrap(),
            ),
        ),
        ("", Box::new(GlobalAvgPool::new(16, 8, 8).unwrap())),
        ("fc", Box::new(Linear::new(16, 10, true))),
    ])
    .unwrap();
    let n = 16;
    net.reserve(n);
    let x = rng.vec_f32(n * net.in_size(), 1.0, 0.0);
    let dy = rng.vec_f32(n * 10, 1.0, 0.0);
    let mut y = vec![0f32; n * 10];
    let mut dx = vec![0f32; x.len()];
    for threads in [1, 2, 3] {
        let ctx = Ctx {
            mode: Mode::Train,
            threads,
        };
        let mut step = |net: &mut Sequential| {
            net.forward(ctx, &x, &mut y, n).unwrap();
            net.backward(ctx, &x, &y, &dy, Some(&mut dx), n);
            net.for_each_param(&mut |p, g| {
                for (a, &b) in p.iter_mut().zip(g) {
                    *a -= 1e-3 * b;
                }
            });
        };
        // Warm up for a while, not just a step: the test harness's own thread may still be
        // reporting the test that held the lock before (allocating) when this one starts.
        let t0 = std::time::Instant::now();
        while t0.elapsed() < std::time::Duration::from_millis(300) {
            step(&mut net);
        }
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        for _ in 0..10 {
            step(&mut net);
        }
        let after = ALLOCATIONS.load(Ordering::SeqCst);
        assert_eq!(after - before, 0, "{threads} threads: allocations in steps");
    }
}

/// Group and layer normalization (maps and features) in a small conv net: forward and backward
/// allocate nothing once reserved, on 1 and 2 threads, in training and inference mode.
fn group_norm_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = common::Lcg(9);
    let mut conv = |cin, cout| -> Box<dyn Layer> {
        let mut c = Conv2d::new(cin, cout, 3, 1, 1, false, 16, 16).unwrap();
        let w = rng.vec_f32(c.weight.len(), 0.3, 0.0);
        c.set_weight(&w);
        Box::new(c)
    };
    let mut net = Sequential::new(vec![
        conv(3, 8),
        Box::new(GroupNorm::group(4, 8, 256, 1e-5, true).unwrap()),
        Box::new(Relu::new(8 * 256)),
        conv(8, 8),
        Box::new(GroupNorm::layer(8, 256, 1e-5, true).unwrap()),
        Box::new(GlobalAvgPool::new(8, 16, 16).unwrap()),
        Box::new(Linear::new(8, 16, true)),
        Box::new(GroupNorm::layer(16, 1, 1e-5, true).unwrap()),
        Box::new(Linear::new(16, 10, true)),
    ]);
    let n = 16;
    net.reserve(n);
    let x = rng.vec_f32(n * net.in_size(), 1.0, 0.0);
    let dy = rng.vec_f32(n * 10, 1.0, 0.0);
    let mut y = vec![0f32; n * 10];
    let mut dx = vec![0f32; x.len()];
    for threads in [1, 2, 3] {
        for mode in [Mode::Train, Mode::Eval] {
            let ctx = Ctx { mode, threads };
            let mut step = |net: &mut Sequential| {
                net.forward(ctx, &x, &mut y, n).unwrap();
                net.backward(ctx, &x, &y, &dy, Some(&mut dx), n);
                net.for_each_param(&mut |p, g| {
                    for (a, &b) in p.iter_mut().zip(g) {
                        *a -= 1e-3 * b;
                    }
                });
            };
            let t0 = std::time::Instant::now();
            while t0.elapsed() < std::time::Duration::from_millis(200) {
                step(&mut net);
            }
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            for _ in 0..10 {
                step(&mut net);
            }
            let after = ALLOCATIONS.load(Ordering::SeqCst);
            assert_eq!(
                after - before,
                0,
                "{threads} threads, {mode:?}: allocations in steps"
            );
        }
    }
}

/// The BatchNorm family (ghost batches, batch renorm with its schedule, frozen BN) and
/// grouped (non-i.i.d.) batches across many epochs: nothing allocates once the first steps
/// have sized the buffers. A small synthetic data set (10 classes x 20 images of 12x12), so
/// that grouped epochs (5 batches each) turn over many times.
fn normalizer_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = common::Lcg(9);
    let n = 200;
    let pixels = rng.vec_f32(n * 144, 0.5, 0.5);
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let data = bnlab::data::Dataset::new(bnlab::data::Pixels::F32(pixels), labels, [1, 12, 12], 10)
        .unwrap();
    let base = bnlab::model::preset("vgg-mini-bn").unwrap();
    for (norm, order, freeze) in [
        ("ghost:8", Order::Shuffle, None),
        ("brn", Order::Shuffle, None),
        ("noisy-bn", Order::Shuffle, None),
        ("bn", Order::Grouped { classes: 2 }, None),
        ("bn", Order::Shuffle, Some(bnlab::train::FreezeBn::Running)),
    ] {
        for threads in [1, 2, 3] {
            let spec =
                bnlab::model::apply_norm(&base, bnlab::model::NormChoice::parse(norm).unwrap())
                    .unwrap();
            let input = bnlab::model::resolve_input(&spec, Some(&[1, 12, 12])).unwrap();
            let mut net = Network::build(&spec, &input, 3, 32, threads).unwrap();
            let cfg = TrainConfig {
                steps: 60,
                batch_size: 32,
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 1e-4,
                schedule: Schedule::Constant,
                seed: 3,
                order,
                eval_every: 0,
                threads,
                augment: bnlab::train::Augment::None,
                bn: bnlab::train::BnTraining {
                    freeze,
                    renorm_schedule: bnlab::nn::RenormSchedule::parse("0,0.5,0.5").unwrap(),
                },
            };
            let mut t = Trainer::new(cfg, data.len(), data.features());
            for _ in 0..3 {
                t.step(&mut net, &data).unwrap();
            }
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            for _ in 0..50 {
                t.step(&mut net, &data).unwrap();
            }
            let after = ALLOCATIONS.load(Ordering::SeqCst);
            assert_eq!(
                after - before,
                0,
                "{norm}, {order:?}, {freeze:?}, {threads} threads: allocations in steps"
            );
        }
    }
}

/// The second EMA of `reproduce precise-bn` (`EmaStats::update` after every step) allocates
/// nothing either.
fn second_ema_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut rng = common::Lcg(11);
    let n = 200;
    let pixels = rng.vec_f32(n * 144, 0.5, 0.5);
    let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
    let data = bnlab::data::Dataset::new(bnlab::data::Pixels::F32(pixels), labels, [1, 12, 12], 10)
        .unwrap();
    let spec = bnlab::model::preset("vgg-mini-bn").unwrap();
    let input = bnlab::model::resolve_input(&spec, Some(&[1, 12, 12])).unwrap();
    let mut net = Network::build(&spec, &input, 3, 32, 1).unwrap();
    let cfg = TrainConfig {
        steps: 60,
        batch_size: 32,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.0,
        schedule: Schedule::Constant,
        seed: 3,
        order: Order::Shuffle,
        eval_every: 0,
        threads: 1,
        augment: bnlab::train::Augment::None,
        bn: Default::default(),
    };
    let mut ema = bnlab::experiments::precise_bn::EmaStats::new(&mut net, 0.01).unwrap();
    let mut t = Trainer::new(cfg, data.len(), data.features());
    for _ in 0..3 {
        t.step(&mut net, &data).unwrap();
        ema.update(&mut net, 32);
    }
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..50 {
        t.step(&mut net, &data).unwrap();
        ema.update(&mut net, 32);
    }
    ema.swap(&mut net);
    ema.swap(&mut net);
    let after = ALLOCATIONS.load(Ordering::SeqCst);
    assert_eq!(after - before, 0, "allocations in steps with a second EMA");
}

fn main() {
    let checks: [(&str, fn()); 6] = [
        (
            "second_ema_steps_do_not_allocate",
            second_ema_steps_do_not_allocate,
        ),
        (
            "normalizer_steps_do_not_allocate",
            normalizer_steps_do_not_allocate,
        ),
        (
            "training_steps_do_not_allocate",
            training_steps_do_not_allocate,
        ),
        (
            "convolutional_training_steps_do_not_allocate",
            convolutional_training_steps_do_not_allocate,
        ),
        (
            "residual_steps_do_not_allocate",
            residual_steps_do_not_allocate,
        ),
        (
            "group_norm_steps_do_not_allocate",
            group_norm_steps_do_not_allocate,
        ),
    ];
    for (name, check) in checks {
        check();
        println!("test {name} ... ok");
    }
}
