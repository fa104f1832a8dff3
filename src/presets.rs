//! The named networks of the paper's experiments, built as the PyTorch `nn.Sequential` models
//! they mirror so that checkpoints carry PyTorch's `state_dict` names.
//!
//! `mlp-fig1` (section 4.1 without BN):
//!   Sequential(Linear(784,100), Sigmoid(), Linear(100,100), Sigmoid(), Linear(100,100), Sigmoid(),
//!              Linear(100,10))
//! `mlp-fig1-bn` (section 4.1 with BN before each sigmoid; the bias is dropped, beta replaces it):
//!   Sequential(Linear(784,100,bias=False), BatchNorm1d(100), Sigmoid(), ... , Linear(100,10))
//!
//! `inception-mini`, `inception-mini-bn`, `inception-mini-bn-sigmoid` are the three variants of
//! ../shared/peers/torch_inception.py; `inception-mini-sigmoid` (no BN, sigmoid, dropout 0.4)
//! and `inception-mini-bn-dropout` (BN, ReLU, dropout 0.4) are the same `InceptionMini` module
//! with the other combinations of its arguments, for the section 4.2 study
//! (`experiments::inception`). Dropout has no state, so the dropout and no-dropout networks
//! share their `state_dict` names; convolutions have biases exactly when not followed by BN.

use crate::nn::{
    AvgPool2d, BatchNorm, Concat, Conv2d, Dropout, GlobalAvgPool, Layer, Linear, MaxPool2d, Relu,
    Sequential, Sigmoid,
};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    MlpFig1,
    MlpFig1Bn,
    /// `inception-mini` of ../shared/peers/torch_inception.py: no BN, dropout 0.4, ReLU.
    InceptionMini,
    /// BN after every convolution, no dropout, ReLU.
    InceptionMiniBn,
    /// As `InceptionMiniBn` with sigmoid in place of ReLU.
    InceptionMiniBnSigmoid,
    /// As `InceptionMini` (no BN, dropout 0.4) with sigmoid in place of ReLU: the section 4.2
    /// study's `Inception-Sigmoid`.
    InceptionMiniSigmoid,
    /// As `InceptionMiniBn` with `InceptionMini`'s dropout 0.4 before the classifier: the
    /// section 4.2 study's `BN-Baseline` ("BN after every convolution, everything else as
    /// Inception"; removing dropout is one of the section 4.2.1 changes).
    InceptionMiniBnDropout,
}

pub const PRESET_NAMES: &[&str] = &[
    "mlp-fig1",
    "mlp-fig1-bn",
    "inception-mini",
    "inception-mini-bn",
    "inception-mini-bn-sigmoid",
    "inception-mini-sigmoid",
    "inception-mini-bn-dropout",
];

impl Preset {
    pub fn parse(name: &str) -> Result<Preset> {
        match name {
            "mlp-fig1" => Ok(Preset::MlpFig1),
            "mlp-fig1-bn" => Ok(Preset::MlpFig1Bn),
            "inception-mini" => Ok(Preset::InceptionMini),
            "inception-mini-bn" => Ok(Preset::InceptionMiniBn),
            "inception-mini-bn-sigmoid" => Ok(Preset::InceptionMiniBnSigmoid),
            "inception-mini-sigmoid" => Ok(Preset::InceptionMiniSigmoid),
            "inception-mini-bn-dropout" => Ok(Preset::InceptionMiniBnDropout),
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
            Preset::InceptionMini => "inception-mini",
            Preset::InceptionMiniBn => "inception-mini-bn",
            Preset::InceptionMiniBnSigmoid => "inception-mini-bn-sigmoid",
            Preset::InceptionMiniSigmoid => "inception-mini-sigmoid",
            Preset::InceptionMiniBnDropout => "inception-mini-bn-dropout",
        }
    }

    pub fn has_batch_norm(&self) -> bool {
        matches!(
            self,
            Preset::MlpFig1Bn
                | Preset::InceptionMiniBn
                | Preset::InceptionMiniBnSigmoid
                | Preset::InceptionMiniBnDropout
        )
    }

    pub fn is_convolutional(&self) -> bool {
        matches!(
            self,
            Preset::InceptionMini
                | Preset::InceptionMiniBn
                | Preset::InceptionMiniBnSigmoid
                | Preset::InceptionMiniSigmoid
                | Preset::InceptionMiniBnDropout
        )
    }

    /// The preset with the same layers minus batch normalization, whose checkpoint a folded
    /// network (see `fold`) is saved as; `None` for presets without BN.
    pub fn plain_counterpart(&self) -> Option<Preset> {
        match self {
            Preset::MlpFig1Bn => Some(Preset::MlpFig1),
            // Dropout is the identity at inference, so it may differ between the two.
            Preset::InceptionMiniBn | Preset::InceptionMiniBnDropout => Some(Preset::InceptionMini),
            Preset::InceptionMiniBnSigmoid => Some(Preset::InceptionMiniSigmoid),
            _ => None,
        }
    }

    /// The shape of one example as the network sees it, without the batch dimension: `[784]`
    /// for the MLPs (a convolutional preset would give `[1, 28, 28]`). Export writes the
    /// model's input as `[N, ..input_shape]`.
    pub fn input_shape(&self) -> &'static [usize] {
        if self.is_convolutional() {
            &[1, 28, 28]
        } else {
            &[784]
        }
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
    pub fn probe_layer(&self) -> Option<usize> {
        match self {
            Preset::MlpFig1 => Some(4),
            Preset::MlpFig1Bn => Some(7),
            _ => None,
        }
    }

    /// Build the network with the paper's initialization: weights from N(0, 0.1^2), biases 0,
    /// BN's gamma 1 and beta 0.
    pub fn build(&self, seed: u64) -> Sequential {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        match self {
            Preset::InceptionMini => return inception_mini(false, false, 0.4, &mut rng),
            Preset::InceptionMiniBn => return inception_mini(true, false, 0.0, &mut rng),
            Preset::InceptionMiniBnSigmoid => return inception_mini(true, true, 0.0, &mut rng),
            Preset::InceptionMiniSigmoid => return inception_mini(false, true, 0.4, &mut rng),
            Preset::InceptionMiniBnDropout => return inception_mini(true, false, 0.4, &mut rng),
            Preset::MlpFig1 | Preset::MlpFig1Bn => {}
        }
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

/// PyTorch's default initialization of Conv2d and Linear: weight and bias from
/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (kaiming_uniform with a = sqrt(5)).
fn fill_uniform(out: &mut [f32], fan_in: usize, rng: &mut ChaCha8Rng) {
    let bound = 1.0 / (fan_in as f64).sqrt();
    for v in out {
        *v = ((rng.gen::<f64>() * 2.0 - 1.0) * bound) as f32;
    }
}

/// ConvUnit of torch_inception.py: conv (no bias when followed by BN) -> [BN] -> nonlinearity,
/// named `conv`, `bn`, `act`, on `h x w` maps.
fn conv_unit(
    cin: usize,
    cout: usize,
    k: usize,
    bn: bool,
    sigmoid: bool,
    hw: usize,
    rng: &mut ChaCha8Rng,
) -> Box<dyn Layer> {
    let mut conv =
        Conv2d::new(cin, cout, k, 1, k / 2, !bn, hw, hw).expect("preset convolution geometry");
    let fan_in = cin * k * k;
    fill_uniform(&mut conv.weight, fan_in, rng);
    if let Some(b) = &mut conv.bias {
        fill_uniform(b, fan_in, rng);
    }
    let size = cout * hw * hw;
    let act: Box<dyn Layer> = if sigmoid {
        Box::new(Sigmoid::new(size))
    } else {
        Box::new(Relu::new(size))
    };
    let mut children: Vec<(&str, Box<dyn Layer>)> = vec![("conv", Box::new(conv))];
    if bn {
        children.push(("bn", Box::new(BatchNorm::new(cout, hw * hw, 1e-5, true))));
    }
    children.push(("act", act));
    Box::new(Sequential::named(children).expect("preset conv unit"))
}

/// The Inception block of torch_inception.py: four branches concatenated on channels, in order
/// b1: 1x1; b2: 1x1 -> 3x3; b3: 1x1 -> 3x3 -> 3x3; b4: 3x3 average pool (stride 1, padding 1,
/// padding counted) -> 1x1.
#[allow(clippy::too_many_arguments)]
fn inception_block(
    cin: usize,
    c: [usize; 6],
    bn: bool,
    sigmoid: bool,
    hw: usize,
    rng: &mut ChaCha8Rng,
) -> Box<dyn Layer> {
    let [c1, c2r, c2, c3r, c3, c4] = c;
    let b1 = conv_unit(cin, c1, 1, bn, sigmoid, hw, rng);
    let b2 = Sequential::new(vec![
        conv_unit(cin, c2r, 1, bn, sigmoid, hw, rng),
        conv_unit(c2r, c2, 3, bn, sigmoid, hw, rng),
    ]);
    let b3 = Sequential::new(vec![
        conv_unit(cin, c3r, 1, bn, sigmoid, hw, rng),
        conv_unit(c3r, c3, 3, bn, sigmoid, hw, rng),
        conv_unit(c3, c3, 3, bn, sigmoid, hw, rng),
    ]);
    // The pool is applied in the block's forward, outside b4: it adds no naming level.
    let pool = AvgPool2d::new(cin, 3, 1, 1, hw, hw, true).expect("preset pool geometry");
    let b4 = Sequential::named(vec![
        ("", Box::new(pool)),
        ("", conv_unit(cin, c4, 1, bn, sigmoid, hw, rng)),
    ])
    .expect("preset branch b4");
    Box::new(
        Concat::new(vec![
            ("b1", b1),
            ("b2", Box::new(b2)),
            ("b3", Box::new(b3)),
            ("b4", Box::new(b4)),
        ])
        .expect("preset inception block"),
    )
}

/// InceptionMini of torch_inception.py, for 1x28x28 images: stem 3x3 conv (32) -> 2x2 max pool
/// -> Inception a (104 maps, 14x14) -> 2x2 max pool -> Inception b (176 maps, 7x7) -> global
/// average pool -> [dropout] -> fc (176 -> 10).
fn inception_mini(bn: bool, sigmoid: bool, dropout: f32, rng: &mut ChaCha8Rng) -> Sequential {
    let stem = conv_unit(1, 32, 3, bn, sigmoid, 28, rng);
    let a = inception_block(32, [32, 24, 32, 16, 24, 16], bn, sigmoid, 14, rng);
    let b = inception_block(104, [48, 32, 64, 24, 32, 32], bn, sigmoid, 7, rng);
    let mut fc = Linear::new(176, 10, true);
    let mut w = vec![0.0; 1760];
    fill_uniform(&mut w, 176, rng);
    fc.set_weight(&w);
    if let Some(bias) = &mut fc.bias {
        fill_uniform(bias, 176, rng);
    }
    let mut children: Vec<(&str, Box<dyn Layer>)> = vec![
        ("stem", stem),
        (
            "",
            Box::new(MaxPool2d::new(32, 2, 2, 0, 28, 28).expect("preset pool")),
        ),
        ("a", a),
        (
            "",
            Box::new(MaxPool2d::new(104, 2, 2, 0, 14, 14).expect("preset pool")),
        ),
        ("b", b),
        (
            "",
            Box::new(GlobalAvgPool::new(176, 7, 7).expect("preset pool")),
        ),
    ];
    if dropout > 0.0 {
        children.push(("dropout", Box::new(Dropout::new(176, dropout, rng.gen()))));
    }
    children.push(("fc", Box::new(fc)));
    Sequential::named(children).expect("preset inception-mini")
}
