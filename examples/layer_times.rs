//! Time one layer of each kind the inception-mini presets use, forward and backward, on the
//! shapes of the network (batch 32). A profiling aid: `cargo run --release --example layer_times`.
use bnlab::nn::{AvgPool2d, BatchNorm, Conv2d, Ctx, Layer, MaxPool2d, Mode, Relu};
use std::time::Instant;

fn time(name: &str, layer: &mut dyn Layer, n: usize, threads: usize) {
    time_flops(name, layer, n, threads, 0.0)
}

/// As `time`, and the forward pass's and the backward pass's GFLOP/s when `flops` (the
/// forward pass's multiply-adds times 2) is given; the backward pass does twice that.
fn time_flops(name: &str, layer: &mut dyn Layer, n: usize, threads: usize, flops: f64) {
    layer.reserve(n);
    let x: Vec<f32> = (0..n * layer.in_size())
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
        .collect();
    let mut y = vec![0f32; n * layer.out_size()];
    let dy: Vec<f32> = (0..y.len())
        .map(|i| ((i * 31 % 100) as f32 - 50.0) / 50.0)
        .collect();
    let mut dx = vec![0f32; x.len()];
    let ctx = Ctx {
        mode: Mode::Train,
        threads,
    };
    let reps = 50;
    let mut best_f = f64::MAX;
    let mut best_b = f64::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        layer.forward(ctx, &x, &mut y, n).unwrap();
        best_f = best_f.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        layer.backward(ctx, &x, &y, &dy, Some(&mut dx), n);
        best_b = best_b.min(t.elapsed().as_secs_f64());
    }
    let rate = if flops > 0.0 {
        format!(
            "  {:5.1} / {:5.1} GFLOP/s",
            flops / best_f / 1e9,
            2.0 * flops / best_b / 1e9
        )
    } else {
        String::new()
    };
    println!(
        "{name:40} fwd {:8.1} us  bwd {:8.1} us  ({} in/example){rate}",
        best_f * 1e6,
        best_b * 1e6,
        layer.in_size()
    );
}

fn main() {
    let threads: usize = std::env::args().nth(1).map_or(1, |s| s.parse().unwrap());
    if std::env::args().nth(2).as_deref() == Some("resnet") {
        // ResNet-20's convolutions on Fashion-MNIST (28x28), batch 128.
        let n = 128;
        for (cin, cout, k, s, hw) in [
            (1, 16, 3, 1, 28),
            (16, 16, 3, 1, 28),
            (16, 32, 3, 2, 28),
            (16, 32, 1, 2, 28),
            (32, 32, 3, 1, 14),
            (32, 64, 3, 2, 14),
            (64, 64, 3, 1, 7),
        ] {
            let mut c = Conv2d::new(cin, cout, k, s, k / 2, false, hw, hw).unwrap();
            let ohw = c.out_h * c.out_w;
            let flops = 2.0 * (n * cout * cin * k * k * ohw) as f64;
            time_flops(
                &format!("conv {cin}->{cout} k{k} s{s} {hw}x{hw}"),
                &mut c,
                n,
                threads,
                flops,
            );
        }
        time(
            "bn 16x28x28",
            &mut BatchNorm::new(16, 28 * 28, 1e-5, true),
            n,
            threads,
        );
        time("relu 16x28x28", &mut Relu::new(16 * 784), n, threads);
        return;
    }
    let n = 32;
    time(
        "maxpool 32x28x28",
        &mut MaxPool2d::new(32, 2, 2, 0, 28, 28).unwrap(),
        n,
        threads,
    );
    time(
        "avgpool3 32x14x14",
        &mut AvgPool2d::new(32, 3, 1, 1, 14, 14, true).unwrap(),
        n,
        threads,
    );
    time(
        "avgpool3 104x7x7",
        &mut AvgPool2d::new(104, 3, 1, 1, 7, 7, true).unwrap(),
        n,
        threads,
    );
    time(
        "bn 32x28x28",
        &mut BatchNorm::new(32, 28 * 28, 1e-5, true),
        n,
        threads,
    );
    time("relu 32x28x28", &mut Relu::new(32 * 784), n, threads);
    for (cin, cout, k, hw) in [
        (1, 32, 3, 28),
        (32, 32, 1, 14),
        (24, 32, 3, 14),
        (16, 24, 3, 14),
        (24, 24, 3, 14),
        (104, 48, 1, 7),
        (32, 64, 3, 7),
        (32, 32, 3, 7),
    ] {
        let mut c = Conv2d::new(cin, cout, k, 1, k / 2, false, hw, hw).unwrap();
        let flops = 2.0 * (n * cout * cin * k * k * hw * hw) as f64;
        time_flops(
            &format!(
                "conv {cin}->{cout} k{k} {hw}x{hw} ({:.0} MFLOP)",
                flops / 1e6
            ),
            &mut c,
            n,
            threads,
            flops,
        );
    }
}
