//! Steps per second with and without the BN + activation fusion, alternated, on random data:
//! `cargo run --release --example fusion_ab -- PRESET BATCH STEPS ROUNDS [C H W]`.
use bnlab::model;
use bnlab::network::Network;
use bnlab::nn::sequential::fuse_activations;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let preset = a.get(1).map_or("inception-mini-bn", |s| s.as_str());
    let batch: usize = a.get(2).map_or(32, |s| s.parse().unwrap());
    let steps: usize = a.get(3).map_or(50, |s| s.parse().unwrap());
    let rounds: usize = a.get(4).map_or(3, |s| s.parse().unwrap());
    let shape: Vec<usize> = a[5.min(a.len())..]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let spec = model::preset(preset).unwrap();
    let input = model::resolve_input(&spec, (!shape.is_empty()).then_some(&shape[..])).unwrap();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut net = Network::build(&spec, &input, 1, batch, threads).unwrap();
    let features: usize = input.iter().product();
    let x: Vec<f32> = (0..batch * features)
        .map(|i| ((i * 7919 % 1000) as f32) / 1000.0)
        .collect();
    let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();
    for round in 0..rounds {
        for on in [true, false] {
            fuse_activations(&mut net.body, on);
            net.forward_backward(&x, &labels, batch).unwrap();
            let t = Instant::now();
            for _ in 0..steps {
                net.forward_backward(&x, &labels, batch).unwrap();
            }
            let rate = steps as f64 / t.elapsed().as_secs_f64();
            println!("round {round} fused {on:5}: {rate:8.2} steps/s (forward + backward)");
        }
    }
}
