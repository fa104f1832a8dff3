//! Folding batch normalization into the layer before it, for inference.
//!
//! At inference the statistics are fixed, so BN "is simply a linear transform applied to each
//! activation", which composes with gamma and beta into one affine map per feature (paper,
//! end of section 3.1): `y = gamma (x - mean) / sqrt(var + eps) + beta`, with `mean` and `var`
//! the layer's inference statistics (running averages, or Algorithm 2's population
//! statistics). After a Linear `x = W u + b` that map folds into the Linear:
//!
//! ```text
//! s  = gamma / sqrt(var + eps)     (gamma = 1 without affine parameters)
//! W' = diag(s) W                   (output row r of W scaled by s[r])
//! b' = (b - mean) s + beta         (b = 0 for a Linear without bias; beta = 0 without
//!                                   affine parameters)
//! ```
//!
//! `fold` turns a network of a BN preset into one of its plain counterpart (`mlp-fig1-bn` ->
//! `mlp-fig1`), so the result trains, evaluates, saves and loads under the plain preset's
//! PyTorch names. `s` and the products are computed in f64 and rounded once to f32.

use crate::network::Network;
use crate::nn::{BatchNorm, Dropout, Layer, Linear, Relu, Sigmoid};
use crate::{Error, Result};

/// One layer of the folded network, as read from the BN network.
enum Folded {
    /// A Linear with PyTorch's `[out, in]` weight and a bias.
    Linear {
        in_features: usize,
        out_features: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    },
    /// A layer without parameters, named by `describe`, copied as it is.
    Stateless(String),
}

/// A network of `bn_net`'s plain counterpart preset computing the same inference function,
/// each BatchNorm folded into the Linear before it with the BN's current inference statistics
/// (see `BatchNorm::inference_stats`). `bn_net` is not changed (`&mut` only to reach its
/// layers). Errors when the preset has no plain counterpart or the layers are not the
/// expected `Linear -> BatchNorm` pairs and parameter-free layers.
pub fn fold(bn_net: &mut Network) -> Result<Network> {
    let preset = bn_net.preset;
    let plain = preset.plain_counterpart().ok_or_else(|| {
        Error::config(
            "model",
            format!(
                "{} has no batch normalization to fold (no plain counterpart)",
                preset.name()
            ),
        )
    })?;
    let unexpected =
        |msg: String| Error::config("model", format!("cannot fold {}: {msg}", preset.name()));

    let layers = &mut bn_net.body.layers;
    let mut folded = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let any = layers[i].as_any_mut();
        if let Some(lin) = any.downcast_mut::<Linear>() {
            let (in_f, out_f) = (lin.in_features, lin.out_features);
            // PyTorch's [out, in] layout from the stored [in, out].
            let mut weight = vec![0.0f32; in_f * out_f];
            for (c, row) in lin.weight_t.chunks_exact(out_f).enumerate() {
                for (r, &v) in row.iter().enumerate() {
                    weight[r * in_f + c] = v;
                }
            }
            let bias = lin.bias.clone();
            let next_bn = layers
                .get_mut(i + 1)
                .and_then(|l| l.as_any_mut().downcast_mut::<BatchNorm>());
            match next_bn {
                Some(bn) => {
                    if bn.s != 1 || bn.c != out_f {
                        return Err(unexpected(format!(
                            "layer {} ({}) does not normalize the {out_f} outputs of layer {i}",
                            i + 1,
                            bn.describe()
                        )));
                    }
                    let (w, b) = fold_pair(&weight, bias.as_deref(), in_f, bn);
                    folded.push(Folded::Linear {
                        in_features: in_f,
                        out_features: out_f,
                        weight: w,
                        bias: Some(b),
                    });
                    i += 2;
                }
                None => {
                    folded.push(Folded::Linear {
                        in_features: in_f,
                        out_features: out_f,
                        weight,
                        bias,
                    });
                    i += 1;
                }
            }
            continue;
        }
        if any.is::<Sigmoid>() || any.is::<Relu>() || any.is::<Dropout>() {
            folded.push(Folded::Stateless(layers[i].describe()));
            i += 1;
            continue;
        }
        return Err(unexpected(format!(
            "layer {i} ({}) is not a Linear, a Linear's BatchNorm or a parameter-free layer",
            layers[i].describe()
        )));
    }

    let mut out = Network::new(plain, 0, bn_net.max_batch(), bn_net.threads);
    let targets = &mut out.body.layers;
    if targets.len() != folded.len() {
        return Err(unexpected(format!(
            "{} layers after folding, {} has {}",
            folded.len(),
            plain.name(),
            targets.len()
        )));
    }
    for (j, (src, dst)) in folded.into_iter().zip(targets.iter_mut()).enumerate() {
        let what = dst.describe();
        match src {
            Folded::Linear {
                in_features,
                out_features,
                weight,
                bias,
            } => {
                let Some(lin) = dst.as_any_mut().downcast_mut::<Linear>() else {
                    return Err(unexpected(format!(
                        "folded layer {j} is a Linear, {} has {what}",
                        plain.name()
                    )));
                };
                if (lin.in_features, lin.out_features) != (in_features, out_features)
                    || lin.bias.is_some() != bias.is_some()
                {
                    return Err(unexpected(format!(
                        "folded layer {j} is Linear({in_features}, {out_features}{}), {} has {what}",
                        if bias.is_some() { "" } else { ", bias=False" },
                        plain.name()
                    )));
                }
                lin.set_weight(&weight);
                lin.bias = bias;
            }
            Folded::Stateless(desc) => {
                if desc != what {
                    return Err(unexpected(format!(
                        "folded layer {j} is {desc}, {} has {what}",
                        plain.name()
                    )));
                }
            }
        }
    }
    Ok(out)
}

/// `W' = diag(s) W` and `b' = (b - mean) s + beta` for a `[out, in]` weight, in f64.
fn fold_pair(
    weight: &[f32],
    bias: Option<&[f32]>,
    in_f: usize,
    bn: &BatchNorm,
) -> (Vec<f32>, Vec<f32>) {
    let (mean, var) = bn.inference_stats();
    let eps = bn.eps as f64;
    let mut w = vec![0.0f32; weight.len()];
    let mut b = vec![0.0f32; bn.c];
    for r in 0..bn.c {
        let gamma = bn.gamma.as_ref().map_or(1.0, |g| g[r] as f64);
        let beta = bn.beta.as_ref().map_or(0.0, |v| v[r] as f64);
        let s = gamma / (var[r] as f64 + eps).sqrt();
        for (o, &v) in w[r * in_f..(r + 1) * in_f]
            .iter_mut()
            .zip(&weight[r * in_f..(r + 1) * in_f])
        {
            *o = (v as f64 * s) as f32;
        }
        let b0 = bias.map_or(0.0, |b| b[r] as f64);
        b[r] = ((b0 - mean[r] as f64) * s + beta) as f32;
    }
    (w, b)
}
