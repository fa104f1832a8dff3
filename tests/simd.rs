//! The SIMD levels (baseline, AVX2, AVX-512): the same bits at every level the CPU has, kernel by
//! kernel (products, BN, activations, pools, convolutions) and for whole training runs, and the
//! `BNLAB_SIMD` override. On a CPU without AVX-512 (or AVX2) those levels are skipped with a note.

mod common;

use bnlab::kernels::activation;
use bnlab::kernels::matmul::{matmul, Trans};
use bnlab::kernels::simd::{self, Level};
use bnlab::nn::{
    AvgPool2d, BatchNorm, Conv2d, ConvAlgo, Ctx, GlobalAvgPool, Layer, Linear, MaxPool2d, Mode,
    Relu, Sigmoid, Tanh,
};
use common::Lcg;
use std::process::Command;
use std::sync::Mutex;

/// The level is process-wide: the in-process comparisons take turns.
static LEVEL_LOCK: Mutex<()> = Mutex::new(());

/// The levels this CPU supports, noting the ones skipped.
fn levels() -> Vec<Level> {
    let (have, lack): (Vec<Level>, Vec<Level>) =
        Level::ALL.into_iter().partition(|l| l.supported());
    for l in lack {
        eprintln!("note: this CPU lacks {l}; its cases are skipped");
    }
    have
}

/// `f` run at every supported level: each result must equal the baseline's, bit for bit.
fn same_at_every_level<T: PartialEq + std::fmt::Debug>(what: &str, f: impl Fn() -> T) {
    let _guard = LEVEL_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let before = simd::level();
    let mut want = None;
    for l in levels() {
        simd::force(l);
        assert_eq!(simd::level(), l, "force({l}) did not take");
        let got = f();
        match &want {
            None => want = Some(got),
            Some(w) => assert!(*w == got, "{what}: {l} gives other bits than baseline"),
        }
    }
    simd::force(before);
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn this_cpu_runs_what_it_detects() {
    let l = levels();
    assert_eq!(l.first(), Some(&Level::Baseline));
    assert_eq!(*l.last().unwrap(), simd::detected());
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("fma")
    {
        assert_eq!(simd::detected(), Level::Avx512);
    }
}

#[test]
fn products_are_the_same_at_every_level() {
    let shapes = [
        (1, 1, 1),
        (1, 7, 9),
        (3, 5, 7),
        (4, 16, 16),
        (5, 17, 33),
        (2, 40, 8),
        (13, 100, 31),
        (37, 64, 129),
        (64, 576, 64),
        (130, 70, 90),
        (9, 300, 47),
        (300, 200, 150),
    ];
    let mut rng = Lcg(0x51d_0001);
    for (m, k, n) in shapes {
        let a = rng.vec_f32(m * k, 1.0, 0.0);
        let b = rng.vec_f32(k * n, 1.0, 0.0);
        let c0 = rng.vec_f32(m * n, 1.0, 0.0);
        for trans in [Trans::No, Trans::A, Trans::B] {
            for accumulate in [false, true] {
                for threads in [1, 2] {
                    same_at_every_level(
                        &format!("matmul {m}x{k}x{n} {trans:?} acc={accumulate} t={threads}"),
                        || {
                            let mut c = c0.clone();
                            matmul(&mut c, &a, &b, m, k, n, trans, accumulate, threads);
                            bits(&c)
                        },
                    );
                }
            }
        }
    }
}

/// Forward (train mode, then eval mode) and backward of a fresh layer with parameters drawn
/// from `seed`: outputs, input gradients and parameter gradients, as bits.
fn layer_bits(make: &dyn Fn() -> Box<dyn Layer>, n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = Lcg(seed);
    let mut layer = make();
    layer.for_each_param(&mut |p, _| {
        for v in p.iter_mut() {
            *v = rng.next() as f32 * 0.5 + 0.25;
        }
    });
    layer.reserve(n);
    let x = rng.vec_f32(n * layer.in_size(), 2.0, 0.1);
    let dy = rng.vec_f32(n * layer.out_size(), 1.0, 0.0);
    let mut y = vec![0f32; n * layer.out_size()];
    let mut dx = vec![0f32; x.len()];
    let mut out = Vec::new();
    for threads in [1, 2] {
        let ctx = Ctx {
            mode: Mode::Train,
            threads,
        };
        layer.zero_grad();
        layer.forward(ctx, &x, &mut y, n).unwrap();
        layer.backward(ctx, &x, &y, &dy, Some(&mut dx), n);
        out.push(bits(&y));
        out.push(bits(&dx));
        layer.for_each_param(&mut |_, g| out.push(bits(g)));
        let eval = Ctx {
            mode: Mode::Eval,
            threads,
        };
        layer.forward(eval, &x, &mut y, n).unwrap();
        out.push(bits(&y));
    }
    out
}

/// A layer to test: its name, how to make it, the batch size.
type Case<'a> = (&'a str, Box<dyn Fn() -> Box<dyn Layer>>, usize);

fn layers_are_the_same(cases: Vec<Case>) {
    for (i, (name, make, n)) in cases.iter().enumerate() {
        let got = layer_bits(make.as_ref(), *n, 0xbeef + i as u64);
        assert!(
            got.iter().any(|v| v.iter().any(|&b| b != 0)),
            "{name}: all zero"
        );
        same_at_every_level(name, || layer_bits(make.as_ref(), *n, 0xbeef + i as u64));
    }
}

#[test]
fn batch_norm_is_the_same_at_every_level() {
    layers_are_the_same(vec![
        (
            "bn 5x7x7",
            Box::new(|| Box::new(BatchNorm::new(5, 49, 1e-5, true))),
            3,
        ),
        (
            "bn 3x28x28",
            Box::new(|| Box::new(BatchNorm::new(3, 784, 1e-5, true))),
            4,
        ),
        (
            "bn1d 37",
            Box::new(|| Box::new(BatchNorm::new(37, 1, 1e-3, true))),
            21,
        ),
        (
            "bn 6x5x5 no affine",
            Box::new(|| Box::new(BatchNorm::new(6, 25, 1e-5, false))),
            2,
        ),
    ]);
}

#[test]
fn activations_are_the_same_at_every_level() {
    layers_are_the_same(vec![
        ("sigmoid 37", Box::new(|| Box::new(Sigmoid::new(37))), 5),
        ("tanh 37", Box::new(|| Box::new(Tanh::new(37))), 5),
        ("relu 37", Box::new(|| Box::new(Relu::new(37))), 5),
        ("sigmoid 1000", Box::new(|| Box::new(Sigmoid::new(1000))), 3),
        ("tanh 1000", Box::new(|| Box::new(Tanh::new(1000))), 3),
    ]);
    // The kernels themselves, on values spanning the saturated ranges.
    let x: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) / 20.0).collect();
    let dy: Vec<f32> = (0..1001)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    same_at_every_level("activation kernels", || {
        let mut y = vec![0f32; x.len()];
        let mut dx = vec![0f32; x.len()];
        let mut out = Vec::new();
        activation::sigmoid_forward(&x, &mut y);
        activation::sigmoid_backward(&y, &dy, &mut dx);
        out.push(bits(&y));
        out.push(bits(&dx));
        activation::tanh_forward(&x, &mut y);
        activation::tanh_backward(&y, &dy, &mut dx);
        out.push(bits(&y));
        out.push(bits(&dx));
        out
    });
}

#[test]
fn pools_convolutions_and_linear_layers_are_the_same_at_every_level() {
    layers_are_the_same(vec![
        (
            "maxpool 2x2/2 on 3x28x28",
            Box::new(|| Box::new(MaxPool2d::new(3, 2, 2, 0, 28, 28).unwrap())),
            2,
        ),
        (
            "maxpool 3x3/2 pad 1 on 4x9x11",
            Box::new(|| Box::new(MaxPool2d::new(4, 3, 2, 1, 9, 11).unwrap())),
            3,
        ),
        (
            "avgpool 3x3/1 pad 1 on 5x7x7",
            Box::new(|| Box::new(AvgPool2d::new(5, 3, 1, 1, 7, 7, true).unwrap())),
            3,
        ),
        (
            "avgpool 3x3/1 pad 1 on 2x14x14 excl. pad",
            Box::new(|| Box::new(AvgPool2d::new(2, 3, 1, 1, 14, 14, false).unwrap())),
            2,
        ),
        (
            "avgpool 2x2/2 on 3x6x6",
            Box::new(|| Box::new(AvgPool2d::new(3, 2, 2, 0, 6, 6, true).unwrap())),
            2,
        ),
        (
            "global avgpool 7x5x5",
            Box::new(|| Box::new(GlobalAvgPool::new(7, 5, 5).unwrap())),
            3,
        ),
        (
            "conv 3x3 3->5 on 9x9",
            Box::new(|| Box::new(Conv2d::new(3, 5, 3, 1, 1, true, 9, 9).unwrap())),
            2,
        ),
        (
            // Input gradient by taps (4 + 2 row tiles, column tails at 81 pixels).
            "conv 3x3 6->5 on 9x9",
            Box::new(|| Box::new(Conv2d::new(6, 5, 3, 1, 1, true, 9, 9).unwrap())),
            3,
        ),
        (
            // Winograd's transforms: 16 channels and a tail of 4 (masked lanes), odd maps.
            "conv 3x3 20->18 on 7x9, winograd",
            Box::new(|| {
                let mut c = Conv2d::new(20, 18, 3, 1, 1, true, 7, 9).unwrap();
                c.set_algo(ConvAlgo::Winograd);
                Box::new(c)
            }),
            3,
        ),
        (
            "conv 1x1 24->32 on 14x14",
            Box::new(|| Box::new(Conv2d::new(24, 32, 1, 1, 0, false, 14, 14).unwrap())),
            3,
        ),
        (
            "conv 3x3/2 16->24 on 15x15",
            Box::new(|| Box::new(Conv2d::new(16, 24, 3, 2, 1, false, 15, 15).unwrap())),
            2,
        ),
        (
            "linear 100->33",
            Box::new(|| Box::new(Linear::new(100, 33, true))),
            7,
        ),
        (
            "linear 784->100",
            Box::new(|| Box::new(Linear::new(784, 100, true))),
            17,
        ),
    ]);
}

// Whole runs through the command line, under `BNLAB_SIMD`.

fn bnlab(args: &[&str], simd_env: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bnlab"));
    c.args(args)
        .env_remove("BNLAB_DATA")
        .env_remove("BNLAB_THREADS");
    match simd_env {
        Some(v) => c.env("BNLAB_SIMD", v),
        None => c.env_remove("BNLAB_SIMD"),
    };
    c.output().expect("bnlab runs")
}

/// A few training steps of a convolutional BN net and of the sigmoid MLP with BN, at every
/// level: the same weights bit for bit. A bad `BNLAB_SIMD` is refused with its name.
#[test]
fn training_gives_the_same_weights_at_every_level() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    common::synthetic_mnist(&data, 256, 64);
    let d = data.to_str().unwrap();
    // inception-mini-bn on the default --conv (winograd), and on direct.
    for (model, batch, conv) in [
        ("inception-mini-bn", "16", "winograd"),
        ("inception-mini-bn", "16", "direct"),
        ("mlp-fig1-bn", "32", "winograd"),
    ] {
        let train = |name: &str, env: Option<&str>| {
            let out = t.path().join(format!("{model}-{conv}-{name}"));
            let o = bnlab(
                &[
                    "train",
                    "--model",
                    model,
                    "--data",
                    d,
                    "--steps",
                    "5",
                    "--batch-size",
                    batch,
                    "--lr",
                    "0.05",
                    "--momentum",
                    "0.9",
                    "--eval-every",
                    "5",
                    "--threads",
                    "2",
                    "--out",
                    out.to_str().unwrap(),
                    "--progress",
                    "plain",
                    "--conv",
                    conv,
                ],
                env,
            );
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            if name == "bogus" {
                assert!(!o.status.success(), "{model}: BNLAB_SIMD=sse9 was accepted");
                return (Vec::new(), err);
            }
            assert!(o.status.success(), "{model} {name}: {err}");
            (common::checkpoint_bits(&out.join("final.safetensors")), err)
        };
        let (base, _) = train("baseline", Some("baseline"));
        assert!(!base.is_empty());
        for l in levels().into_iter().skip(1) {
            let (w, err) = train(l.name(), Some(l.name()));
            assert!(!err.contains("warning"), "{model} {l}: {err}");
            assert!(w == base, "{model}: {l} trains other weights than baseline");
        }
        if model == "mlp-fig1-bn" {
            let (w, err) = train("default", None);
            assert!(w == base, "{model}: the default level trains other weights");
            assert!(!err.contains("BNLAB_SIMD"), "{err}");
            let (_, err) = train("bogus", Some("sse9"));
            assert!(
                err.contains("error") && err.contains("BNLAB_SIMD") && err.contains("sse9"),
                "{err}"
            );
        }
    }
}

/// `bench --json` reports the level it ran on: what `BNLAB_SIMD` asks for (lowered, with a
/// warning, when the CPU lacks it), else the default; a bad value is an error naming it.
#[test]
fn bench_reports_the_level_and_refuses_bad_values() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    common::synthetic_mnist(&data, 128, 16);
    let d = data.to_str().unwrap();
    let args = [
        "bench",
        "--model",
        "mlp-fig1-bn",
        "--data",
        d,
        "--steps",
        "3",
        "--batch-size",
        "8",
        "--json",
    ];
    let bench = |env: Option<&str>| -> (serde_json::Value, String) {
        let o = bnlab(&args, env);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{env:?}: {err}");
        let out = String::from_utf8_lossy(&o.stdout);
        (
            serde_json::from_str(out.lines().last().unwrap()).unwrap(),
            err,
        )
    };
    let (j, _) = bench(None);
    assert_eq!(
        j["simd"],
        simd::detected().min(simd::DEFAULT_MAX).name(),
        "{j}"
    );
    for l in Level::ALL {
        let (j, err) = bench(Some(l.name()));
        if l.supported() {
            assert_eq!(j["simd"], l.name(), "{j}");
            assert!(!err.contains("warning"), "{err}");
        } else {
            eprintln!("note: this CPU lacks {l}: checking it is lowered");
            assert_eq!(j["simd"], simd::detected().name(), "{j}");
            assert!(err.contains("warning") && err.contains(l.name()), "{err}");
        }
    }
    let (j, _) = bench(Some(" AVX2 "));
    assert_eq!(j["simd"], "avx2", "{j}");
    let o = bnlab(&args, Some("avx1024"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "BNLAB_SIMD=avx1024 was accepted");
    assert!(!err.contains("panicked"), "{err}");
    for needle in ["BNLAB_SIMD", "avx1024", "baseline, avx2, avx512"] {
        assert!(err.contains(needle), "expected '{needle}' in: {err}");
    }
}
