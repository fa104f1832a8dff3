//! Measurements on one mini-batch of a trained network: internal covariate shift as Santurkar,
//! Tsipras, Ilyas and Madry define it ("How Does Batch Normalization Help Optimization?",
//! NeurIPS 2018, Definition 2.1), and the loss landscape along the gradient (their section 3.1:
//! loss variation, gradient predictiveness, effective beta-smoothness).
//!
//! Both work on training examples `offset .. offset + batch` in file order, in training mode
//! (batch statistics), through [`crate::train::gradients`]: BN's running statistics and
//! `num_batches_tracked` are not changed. Every gradient of one measurement sees the same
//! dropout masks (the generators are put back before each pass). Afterwards the network is
//! exactly as it was: parameters, buffers and generators bit for bit.
//!
//! "Weight layers" are the `Linear` and `Conv2d` layers, taken in `state_dict` order (the
//! forward order of a sequential network; for branching networks the `state_dict` order
//! decides), each named by its weight's `state_dict` key. "The parameters before a weight
//! layer" are the parameters (weights, biases, BN gamma and beta, GroupNorm's affine) before
//! that weight in `state_dict` order.

use crate::data::Dataset;
use crate::network::Network;
use crate::nn::{Conv2d, Layer, Linear, TensorMut};
use crate::train::{gradients, NamedGrad};
use crate::{Error, Result};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

/// Santurkar et al.'s internal covariate shift at one weight layer.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct IcsLayer {
    /// The `state_dict` key of the layer's weight (`3.weight`).
    pub name: String,
    /// `|G - G'|_2`: how much the layer's weight gradient changes when every parameter before
    /// it takes its SGD step.
    pub l2_diff: f64,
    /// `<G, G'> / (|G| |G'|)`; `None` when either gradient is zero (undefined).
    pub cosine: Option<f64>,
    /// `|G|_2`, the gradient's norm at the original parameters.
    pub grad_norm: f64,
}

/// One point of the loss landscape along the gradient.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LandscapePoint {
    /// The step size along `-g`.
    pub eta: f64,
    /// `L(theta - eta g)`.
    pub loss: f64,
    /// `|grad L(theta - eta g) - g|_2` over every parameter (gradient predictiveness).
    pub grad_change: f64,
}

/// The loss landscape along the gradient of one mini-batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Landscape {
    /// `L(theta)`, the loss at the network's parameters.
    pub loss0: f64,
    /// `|g|_2`, the norm of the gradient of every parameter.
    pub grad_norm: f64,
    /// One point per step size, in the order given.
    pub points: Vec<LandscapePoint>,
    /// The effective beta-smoothness: the largest `grad_change / |eta g|_2` over the step
    /// sizes with a nonzero step (NaN if one of those ratios is NaN); `None` when no step is
    /// nonzero (every eta 0, or g = 0).
    pub beta_smoothness: Option<f64>,
}

/// The `state_dict` keys of the weight layers' weights (`Linear` and `Conv2d`), in
/// `state_dict` order.
pub fn weight_layers(net: &mut Network) -> Vec<String> {
    fn collect(layer: &mut dyn Layer, out: &mut Vec<*const f32>) {
        let any = layer.as_any_mut();
        if let Some(l) = any.downcast_mut::<Linear>() {
            out.push(l.weight_t.as_ptr());
        } else if let Some(c) = any.downcast_mut::<Conv2d>() {
            out.push(c.weight.as_ptr());
        }
        for child in layer.children() {
            collect(child, out);
        }
    }
    let mut ptrs = Vec::new();
    collect(&mut net.body, &mut ptrs);
    let mut names = Vec::new();
    net.visit_state(&mut |name, _, mut t| {
        if let Some(v) = t.floats() {
            if ptrs.contains(&v.as_ptr()) {
                names.push(name.to_string());
            }
        }
    });
    names
}

/// Santurkar et al.'s Definition 2.1 on training examples `offset .. offset + batch`: for each
/// weight layer (see [`weight_layers`]), `G` is the gradient of the loss with respect to its
/// weight, and `G'` the same gradient after every parameter before it has taken one plain SGD
/// step of size `lr` with its own gradient at the original parameters (all other parameters
/// unchanged, same batch). The first weight layer has nothing before it: `G' = G`.
///
/// Costs one forward and backward pass per weight layer (the first shares the pass of `G`).
/// The network is left exactly as it was (see the module doc), also after an error.
///
/// Errors: `lr` negative or not finite (`--lr`), and those of [`crate::train::gradients`]
/// (batch size, examples past the end of `data`, a batch of one for a BN network).
pub fn ics(
    net: &mut Network,
    data: &Dataset,
    offset: usize,
    batch: usize,
    lr: f64,
) -> Result<Vec<IcsLayer>> {
    check_lr(lr)?;
    let saved = Saved::take(net);
    let result = ics_inner(net, data, offset, batch, lr, &saved);
    saved.put_back(net);
    result
}

fn ics_inner(
    net: &mut Network,
    data: &Dataset,
    offset: usize,
    batch: usize,
    lr: f64,
    saved: &Saved,
) -> Result<Vec<IcsLayer>> {
    let weights = weight_layers(net);
    let (_, g0) = pass(net, data, offset, batch, saved)?;
    let theta = read_params(net, &g0);
    let mut out = Vec::with_capacity(weights.len());
    // Parameters 0..stepped have taken their step.
    let mut stepped = 0;
    for name in weights {
        let at = g0
            .iter()
            .position(|g| g.name == name)
            .expect("a weight layer's weight is a parameter");
        let g = &g0[at].values;
        let moved;
        let g_after: &[f32] = if at == 0 {
            g
        } else {
            let step: HashMap<&str, Vec<f32>> = g0[stepped..at]
                .iter()
                .zip(&theta[stepped..at])
                .map(|(p, w)| (p.name.as_str(), sgd_step(w, &p.values, lr)))
                .collect();
            write_params(net, &step);
            stepped = at;
            let (_, after) = pass(net, data, offset, batch, saved)?;
            moved = after.into_iter().nth(at).expect("same parameters").values;
            &moved
        };
        let (mut diff, mut dot, mut nn, mut na) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
        for (&a, &b) in g.iter().zip(g_after) {
            let (a, b) = (a as f64, b as f64);
            diff += (a - b) * (a - b);
            dot += a * b;
            nn += a * a;
            na += b * b;
        }
        // sqrt(nn * na): exactly nn when G' = G, so that the cosine is then exactly 1.
        out.push(IcsLayer {
            name,
            l2_diff: diff.sqrt(),
            cosine: (nn != 0.0 && na != 0.0).then(|| dot / (nn * na).sqrt()),
            grad_norm: nn.sqrt(),
        });
    }
    Ok(out)
}

/// Refuse an SGD step size for [`ics`] that is negative or not finite (`--lr`).
pub fn check_lr(lr: f64) -> Result<()> {
    if !lr.is_finite() || lr < 0.0 {
        return Err(Error::config(
            "--lr",
            format!("{lr} (must be finite and >= 0)"),
        ));
    }
    Ok(())
}

/// Parse `--etas`: comma-separated finite numbers (`0.05,0.1,0.2`), at least one.
pub fn parse_etas(s: &str) -> Result<Vec<f64>> {
    if s.trim().is_empty() {
        return Err(Error::config("--etas", "no step size given"));
    }
    s.split(',')
        .map(|e| match e.trim().parse::<f64>() {
            Ok(v) if v.is_finite() => Ok(v),
            _ => Err(Error::config(
                "--etas",
                format!("'{}' in '{s}' is not a finite number", e.trim()),
            )),
        })
        .collect()
}

/// The loss landscape along the gradient on training examples `offset .. offset + batch`:
/// `g` is the gradient of every parameter at the network's parameters `theta`; for each `eta`
/// of `etas` (any finite value, 0 included), the loss at `theta - eta g` and
/// `|grad L(theta - eta g) - g|_2`; and the effective beta-smoothness (see [`Landscape`]).
///
/// Costs one forward and backward pass per eta, plus one. The network is left exactly as it
/// was (see the module doc), also after an error.
///
/// Errors: `etas` empty or holding a value that is not finite (`--etas`), and those of
/// [`crate::train::gradients`].
pub fn landscape(
    net: &mut Network,
    data: &Dataset,
    offset: usize,
    batch: usize,
    etas: &[f64],
) -> Result<Landscape> {
    if etas.is_empty() {
        return Err(Error::config("--etas", "no step size given"));
    }
    if let Some(e) = etas.iter().find(|e| !e.is_finite()) {
        return Err(Error::config(
            "--etas",
            format!("{e} (every step size must be finite)"),
        ));
    }
    let saved = Saved::take(net);
    let result = landscape_inner(net, data, offset, batch, etas, &saved);
    saved.put_back(net);
    result
}

fn landscape_inner(
    net: &mut Network,
    data: &Dataset,
    offset: usize,
    batch: usize,
    etas: &[f64],
    saved: &Saved,
) -> Result<Landscape> {
    let (loss0, g) = pass(net, data, offset, batch, saved)?;
    let theta = read_params(net, &g);
    let grad_norm = g
        .iter()
        .flat_map(|p| &p.values)
        .map(|&v| v as f64 * v as f64)
        .sum::<f64>()
        .sqrt();
    let mut points = Vec::with_capacity(etas.len());
    let mut beta: Option<f64> = None;
    for &eta in etas {
        let step: HashMap<&str, Vec<f32>> = g
            .iter()
            .zip(&theta)
            .map(|(p, w)| (p.name.as_str(), sgd_step(w, &p.values, eta)))
            .collect();
        write_params(net, &step);
        let (loss, at) = pass(net, data, offset, batch, saved)?;
        let grad_change = at
            .iter()
            .zip(&g)
            .flat_map(|(a, b)| a.values.iter().zip(&b.values))
            .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
            .sum::<f64>()
            .sqrt();
        let length = eta.abs() * grad_norm;
        if length > 0.0 {
            let ratio = grad_change / length;
            beta = Some(match beta {
                Some(b) if b.is_nan() || ratio.is_nan() => f64::NAN,
                Some(b) => b.max(ratio),
                None => ratio,
            });
        }
        points.push(LandscapePoint {
            eta,
            loss,
            grad_change,
        });
    }
    Ok(Landscape {
        loss0,
        grad_norm,
        points,
        beta_smoothness: beta,
    })
}

/// `w - lr g`, in f64, rounded once to f32.
fn sgd_step(w: &[f32], g: &[f32], lr: f64) -> Vec<f32> {
    w.iter()
        .zip(g)
        .map(|(&w, &g)| (w as f64 - lr * g as f64) as f32)
        .collect()
}

/// The loss and every parameter's gradient (PyTorch's layout, `state_dict` order) at the
/// network's current parameters, with the dropout generators as they were at the start.
fn pass(
    net: &mut Network,
    data: &Dataset,
    offset: usize,
    batch: usize,
    saved: &Saved,
) -> Result<(f64, Vec<NamedGrad>)> {
    saved.put_back_rngs(net);
    gradients(net, data, offset, batch)
}

/// The current values of the parameters `like` names, in PyTorch's layout, in its order.
fn read_params(net: &mut Network, like: &[NamedGrad]) -> Vec<Vec<f32>> {
    let index: HashMap<&str, usize> = like
        .iter()
        .enumerate()
        .map(|(i, g)| (g.name.as_str(), i))
        .collect();
    let mut out = vec![Vec::new(); like.len()];
    net.visit_state(&mut |name, shape, t| {
        let Some(&i) = index.get(name) else { return };
        out[i] = match t {
            TensorMut::F32(v) => v.to_vec(),
            TensorMut::F32T(v) => {
                // Stored `cols x rows`; PyTorch's layout is `rows x cols`.
                let (rows, cols) = (shape[0], shape[1]);
                let mut o = vec![0.0; v.len()];
                for c in 0..cols {
                    for r in 0..rows {
                        o[r * cols + c] = v[c * rows + r];
                    }
                }
                o
            }
            TensorMut::I64(_) => Vec::new(),
        };
    });
    out
}

/// Set the parameters `values` names (PyTorch's layout); the others stay.
fn write_params(net: &mut Network, values: &HashMap<&str, Vec<f32>>) {
    net.visit_state(&mut |name, shape, t| {
        let Some(src) = values.get(name) else { return };
        match t {
            TensorMut::F32(v) => v.copy_from_slice(src),
            TensorMut::F32T(v) => {
                let (rows, cols) = (shape[0], shape[1]);
                for c in 0..cols {
                    for r in 0..rows {
                        v[c * rows + r] = src[r * cols + c];
                    }
                }
            }
            TensorMut::I64(_) => {}
        }
    });
}

/// Every tensor of the state and every random generator, to put the network back exactly.
struct Saved {
    tensors: Vec<SavedTensor>,
    rngs: Vec<ChaCha8Rng>,
}

enum SavedTensor {
    Floats(Vec<f32>),
    Int(i64),
}

impl Saved {
    fn take(net: &mut Network) -> Saved {
        let mut tensors = Vec::new();
        net.visit_state(&mut |_, _, t| match t {
            TensorMut::I64(v) => tensors.push(SavedTensor::Int(*v)),
            TensorMut::F32(v) | TensorMut::F32T(v) => tensors.push(SavedTensor::Floats(v.to_vec())),
        });
        let mut rngs = Vec::new();
        net.body.for_each_rng(&mut |r| rngs.push(r.clone()));
        Saved { tensors, rngs }
    }

    fn put_back_rngs(&self, net: &mut Network) {
        let mut i = 0;
        net.body.for_each_rng(&mut |r| {
            *r = self.rngs[i].clone();
            i += 1;
        });
    }

    fn put_back(&self, net: &mut Network) {
        let mut i = 0;
        net.visit_state(&mut |_, _, t| {
            match (t, &self.tensors[i]) {
                (TensorMut::I64(v), SavedTensor::Int(s)) => *v = *s,
                (TensorMut::F32(v) | TensorMut::F32T(v), SavedTensor::Floats(s)) => {
                    v.copy_from_slice(s)
                }
                _ => unreachable!("the state's layout does not change"),
            }
            i += 1;
        });
        self.put_back_rngs(net);
    }
}
