//! bnlab as a library: a network from a model file, a few hundred SGD steps on a data set built
//! in memory, an evaluation, and a checkpoint saved and loaded back. Needs no files and no
//! network access:
//!
//! ```sh
//! cargo run --release --example library
//! ```

use bnlab::checkpoint;
use bnlab::data::{Dataset, Pixels};
use bnlab::model::{self, ModelSpec};
use bnlab::network::Network;
use bnlab::optim::Schedule;
use bnlab::train::{Augment, Evaluator, Order, TrainConfig, Trainer};

/// A model file (docs/models.md): PyTorch's
/// `nn.Sequential(nn.Linear(784, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))`.
/// `model::preset("mlp-fig1-bn")` gives a preset instead, `model::resolve("my-net.json")` a
/// file on disk.
const MODEL: &str = r#"{
  "name": "small-bn",
  "input": [784],
  "layers": [
    {"type": "Linear", "out_features": 64},
    {"type": "BatchNorm1d"},
    {"type": "ReLU"},
    {"type": "Linear", "out_features": 10}
  ]
}"#;

fn main() -> bnlab::Result<()> {
    let train = synthetic(2_000, 1)?;
    let test = synthetic(500, 2)?;

    let spec = ModelSpec::parse(MODEL, "small-bn")?;
    let input = model::resolve_input(&spec, Some(&train.shape()))?;
    let batch = 32;
    let mut net = Network::build(&spec, &input, 1, batch, 1)?;

    let config = TrainConfig {
        steps: 300,
        batch_size: batch,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
        schedule: Schedule::Constant,
        seed: 1,
        order: Order::Shuffle,
        eval_every: 0,
        threads: 1,
        augment: Augment::None,
        bn: Default::default(),
    };
    config.validate(net.has_batch_norm())?;
    let mut trainer = Trainer::new(config, train.len(), train.features());
    while trainer.step < trainer.config.steps {
        let loss = trainer.step(&mut net, &train)?;
        if trainer.step.is_multiple_of(100) {
            println!("step {}: loss {loss:.4}", trainer.step);
        }
    }

    // Inference mode: BN normalizes with its running averages.
    let mut evaluator = Evaluator::new(batch, test.features());
    let ev = evaluator.evaluate(&mut net, &test, None, None)?;
    println!(
        "test accuracy {:.2}% ({} of {}), loss {:.4}",
        100.0 * ev.accuracy(),
        ev.correct,
        ev.total,
        ev.loss
    );

    // A safetensors file with PyTorch's state_dict names (`0.weight`, `1.running_mean`, ...).
    let path =
        std::env::temp_dir().join(format!("bnlab-example-{}.safetensors", std::process::id()));
    checkpoint::save(&mut net, &path)?;
    let mut loaded = Network::build(&spec, &input, 99, batch, 1)?;
    checkpoint::load(&mut loaded, &path)?;
    let again = evaluator.evaluate(&mut loaded, &test, None, None)?;
    std::fs::remove_file(&path).map_err(|e| bnlab::Error::io(&path, e))?;
    println!("saved and loaded back: {} correct", again.correct);

    assert_eq!(
        again.correct, ev.correct,
        "the loaded network predicts differently"
    );
    assert!(
        ev.accuracy() > 0.9,
        "the network did not learn the synthetic task"
    );
    Ok(())
}

/// `n` grey 28x28 images of 10 classes: each class is a fixed pattern of bright pixels, of
/// which every image keeps about 80%, on a background of sparse noise.
fn synthetic(n: usize, seed: u64) -> bnlab::Result<Dataset> {
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let patterns: Vec<Vec<usize>> = (0..10)
        .map(|_| (0..40).map(|_| rng.below(784)).collect())
        .collect();
    let mut rng = XorShift(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) | 1);
    let mut images = vec![0u8; n * 784];
    let mut labels = Vec::with_capacity(n);
    for (i, image) in images.chunks_exact_mut(784).enumerate() {
        let label = i % 10;
        for &p in &patterns[label] {
            if rng.below(10) < 4 {
                image[p] = 150 + rng.below(106) as u8;
            }
        }
        for _ in 0..150 {
            image[rng.below(784)] = rng.below(256) as u8;
        }
        labels.push(label as u8);
    }
    Dataset::new(Pixels::U8(images), labels, [1, 28, 28], 10)
}

/// A small deterministic generator, so that the example needs nothing else.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}
