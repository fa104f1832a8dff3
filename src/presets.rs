//! The named networks of the paper's experiments, built as the PyTorch `nn.Sequential` models
//! they mirror so that checkpoints carry PyTorch's `state_dict` names.
//!
//! `mlp-fig1` (section 4.1 without BN):
//!   Sequential(Linear(784,100), Sigmoid(), Linear(100,100), Sigmoid(), Linear(100,100), Sigmoid(),
//!              Linear(100,10))
//! `mlp-fig1-bn` (section 4.1 with BN before each sigmoid; the bias is dropped, beta replaces it):
//!   Sequential(Linear(784,100,bias=False), BatchNorm1d(100), Sigmoid(), ... , Linear(100,10))

use crate::nn::{BatchNorm, Layer, Linear, Sequential, Sigmoid};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    MlpFig1,
    MlpFig1Bn,
}

pub const PRESET_NAMES: &[&str] = &["mlp-fig1", "mlp-fig1-bn"];

impl Preset {
    pub fn parse(name: &str) -> Result<Preset> {
        match name {
            "mlp-fig1" => Ok(Preset::MlpFig1),
            "mlp-fig1-bn" => Ok(Preset::MlpFig1Bn),
            other => Err(Error::config(
                "--model",
                format!(
                    "unknown preset '{other}' (known: {})",
                    PRESET_NAMES.join(", ")
                ),
            )),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Preset::MlpFig1 => "mlp-fig1",
            Preset::MlpFig1Bn => "mlp-fig1-bn",
        }
    }

    pub fn has_batch_norm(&self) -> bool {
        matches!(self, Preset::MlpFig1Bn)
    }

    /// The preset with the same layers minus batch normalization, whose checkpoint a folded
    /// network (see `fold`) is saved as; `None` for presets without BN.
    pub fn plain_counterpart(&self) -> Option<Preset> {
        match self {
            Preset::MlpFig1Bn => Some(Preset::MlpFig1),
            Preset::MlpFig1 => None,
        }
    }

    /// The shape of one example as the network sees it, without the batch dimension: `[784]`
    /// for the MLPs (a convolutional preset would give `[1, 28, 28]`). Export writes the
    /// model's input as `[N, ..input_shape]`.
    pub fn input_shape(&self) -> &'static [usize] {
        &[784]
    }

    /// Input features per example and number of classes.
    pub fn input_size(&self) -> usize {
        784
    }
    pub fn classes(&self) -> usize {
        10
    }

    /// Index of the layer whose output is the input of the sigmoid that Figure 1 (b, c)
    /// follows: the last hidden layer's pre-activation (after BN in the BN net).
    pub fn probe_layer(&self) -> usize {
        match self {
            Preset::MlpFig1 => 4,
            Preset::MlpFig1Bn => 7,
        }
    }

    /// Build the network with the paper's initialization: weights from N(0, 0.1^2), biases 0,
    /// BN's gamma 1 and beta 0.
    pub fn build(&self, seed: u64) -> Sequential {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let bn = self.has_batch_norm();
        let mut layers: Vec<Box<dyn Layer>> = Vec::new();
        let sizes = [784, 100, 100, 100];
        for (li, w) in sizes.windows(2).enumerate() {
            let mut lin = Linear::new(w[0], w[1], !bn);
            let mut wv = vec![0.0; w[0] * w[1]];
            fill_normal(&mut wv, 0.1, &mut rng);
            lin.set_weight(&wv);
            // The input layer sees raw pixels, mostly zeros.
            lin.sparse_input = li == 0;
            layers.push(Box::new(lin));
            if bn {
                layers.push(Box::new(BatchNorm::new(w[1], 1, 1e-5, true)));
            }
            layers.push(Box::new(Sigmoid::new(w[1])));
        }
        let mut out = Linear::new(100, 10, true);
        let mut wv = vec![0.0; 1000];
        fill_normal(&mut wv, 0.1, &mut rng);
        out.set_weight(&wv);
        layers.push(Box::new(out));
        Sequential::new(layers)
    }
}

/// Standard normal samples by the Box-Muller transform, scaled by `std`.
pub fn fill_normal(out: &mut [f32], std: f64, rng: &mut ChaCha8Rng) {
    let mut i = 0;
    while i < out.len() {
        let u1: f64 = 1.0 - rng.gen::<f64>(); // (0, 1]
        let u2: f64 = rng.gen::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        out[i] = (std * r * t.cos()) as f32;
        if i + 1 < out.len() {
            out[i + 1] = (std * r * t.sin()) as f32;
        }
        i += 2;
    }
}
