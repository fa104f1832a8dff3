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
//! A Conv2d folds the same way, one row of its `[out, in*k*k]` weight per output channel.
//!
//! Group and layer normalization (`GroupNorm`) normalize each example with its own statistics,
//! which no weight can absorb: they stay in the folded model as they are (gamma and beta
//! copied), and a BatchNorm after one cannot be folded (an error).
//!
//! `fold` turns a network of a BN preset into one of its plain counterpart (`mlp-fig1-bn` ->
//! `mlp-fig1`, `inception-mini-bn` -> `inception-mini`), so the result trains, evaluates, saves and loads under the plain preset's
//! PyTorch names. `s` and the products are computed in f64 and rounded once to f32.

use crate::model::{self, Child, ModelSpec, Node};
use crate::network::Network;
use crate::nn::{BatchNorm, Conv2d, Dropout, GroupNorm, Layer, Linear, Noise};
use crate::{Error, Result};

/// One parameterized layer of the folded network, as read from the BN network.
enum Folded {
    /// A Linear with PyTorch's `[out, in]` weight and a bias.
    Linear {
        in_features: usize,
        out_features: usize,
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    },
    /// A Conv2d (geometry `[in, out, k, stride, padding]`) with its `[out, in, k, k]` weight.
    Conv {
        geom: [usize; 5],
        weight: Vec<f32>,
        bias: Option<Vec<f32>>,
    },
    /// A layer without parameters, named by `describe`, that must match the plain network's.
    Stateless(String),
    /// A group or layer norm (named by `describe`): it depends on each example's own
    /// statistics, so it folds into nothing and stays as it is, gamma and beta copied.
    Norm(String, Option<Vec<f32>>, Option<Vec<f32>>),
}

/// The leaves of `layer` in forward order, through every container (`Layer::children`).
fn leaves<'a>(layer: &'a mut dyn Layer, out: &mut Vec<&'a mut dyn Layer>) {
    if layer.children().is_empty() {
        out.push(layer);
    } else {
        for child in layer.children() {
            leaves(child, out);
        }
    }
}

/// The model file of `spec` without batch normalization: every BatchNorm removed and the
/// Conv2d or Linear before it given a bias. When that is a preset up to dropout (the identity
/// at inference), the preset is returned (`mlp-fig1-bn` -> `mlp-fig1`, `inception-mini-bn` ->
/// `inception-mini`), so the folded checkpoint loads under the preset's name; otherwise a
/// model named `<name>-folded`.
pub fn plain_spec(spec: &ModelSpec) -> Result<ModelSpec> {
    fn strip(children: &[Child], path: &str) -> Result<Vec<Child>> {
        let mut out: Vec<Child> = Vec::with_capacity(children.len());
        for (i, c) in children.iter().enumerate() {
            let here = match &c.name {
                Some(n) if n.is_empty() => path.to_string(),
                Some(n) => format!("{path}{n}."),
                None => format!("{path}{i}."),
            };
            let node = match &c.node {
                Node::BatchNorm { .. } => {
                    match out.last_mut().map(|p| &mut p.node) {
                        Some(Node::Linear { bias, .. }) | Some(Node::Conv2d { bias, .. }) => {
                            *bias = true
                        }
                        _ => {
                            return Err(Error::config(
                                "model",
                                format!(
                                    "cannot fold the BatchNorm '{}': it does not follow a Conv2d or Linear in the same container",
                                    here.trim_end_matches('.')
                                ),
                            ))
                        }
                    }
                    continue;
                }
                Node::Sequential { layers } => Node::Sequential {
                    layers: strip(layers, &here)?,
                },
                Node::Concat { branches } => Node::Concat {
                    branches: strip(branches, &here)?,
                },
                Node::Residual {
                    layers,
                    shortcut,
                    relu,
                } => Node::Residual {
                    layers: strip(layers, &here)?,
                    shortcut: match shortcut {
                        Some(s) => {
                            let mut v = strip(std::slice::from_ref(s), &here)?;
                            v.pop().map(Box::new)
                        }
                        None => None,
                    },
                    relu: *relu,
                },
                other => other.clone(),
            };
            out.push(Child {
                name: c.name.clone(),
                node,
            });
        }
        Ok(out)
    }
    fn no_dropout(children: &[Child]) -> Vec<Child> {
        children
            .iter()
            .filter(|c| !matches!(c.node, Node::Dropout { .. } | Node::Noise(_)))
            .map(|c| Child {
                name: c.name.clone(),
                node: match &c.node {
                    Node::Sequential { layers } => Node::Sequential {
                        layers: no_dropout(layers),
                    },
                    Node::Concat { branches } => Node::Concat {
                        branches: no_dropout(branches),
                    },
                    Node::Residual {
                        layers,
                        shortcut,
                        relu,
                    } => Node::Residual {
                        layers: no_dropout(layers),
                        shortcut: shortcut.clone(),
                        relu: *relu,
                    },
                    other => other.clone(),
                },
            })
            .collect()
    }
    let layers = strip(&spec.layers, "")?;
    for name in model::preset_names() {
        let p = model::preset(name)?;
        if p.input == spec.input
            && p.init == spec.init
            && no_dropout(&p.layers) == no_dropout(&layers)
        {
            return Ok(p);
        }
    }
    Ok(ModelSpec {
        name: format!("{}-folded", spec.name),
        description: format!(
            "{} with each BatchNorm folded into the layer before it",
            spec.name
        ),
        input: spec.input.clone(),
        init: spec.init.clone(),
        dataset: spec.dataset.clone(),
        layers,
    })
}

fn conv_geom(c: &Conv2d) -> [usize; 5] {
    [c.in_ch, c.out_ch, c.k, c.stride, c.padding]
}

/// A network of `bn_net`'s plain counterpart preset computing the same inference function,
/// each BatchNorm folded into the Linear or Conv2d before it with the BN's current inference
/// statistics (see `BatchNorm::inference_stats`). The structure is walked generically
/// (through `Sequential` and `Concat` children, in forward order) on both networks and the
/// folded values are copied into the plain network's layers in that order; Dropout (the
/// identity at inference) is skipped on both sides. `bn_net` is not changed (`&mut` only to
/// reach its layers). Errors when the preset has no plain counterpart or the layers do not
/// correspond.
pub fn fold(bn_net: &mut Network) -> Result<Network> {
    if !bn_net.has_batch_norm() {
        return Err(Error::config(
            "model",
            format!("{} has no batch normalization to fold", bn_net.name()),
        ));
    }
    let plain = plain_spec(&bn_net.spec)?;
    let bn_name = bn_net.name().to_string();
    let unexpected = |msg: String| Error::config("model", format!("cannot fold {bn_name}: {msg}"));

    let mut layers: Vec<&mut dyn Layer> = Vec::new();
    leaves(&mut bn_net.body, &mut layers);
    let mut folded = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let any = layers[i].as_any_mut();
        // (weight [out, rest], bias, out channels, spatial size per channel, rows' length)
        let (weight, bias, out_c, spatial, row, kind) =
            if let Some(lin) = any.downcast_mut::<Linear>() {
                let (in_f, out_f) = (lin.in_features, lin.out_features);
                // PyTorch's [out, in] layout from the stored [in, out].
                let mut weight = vec![0.0f32; in_f * out_f];
                for (c, r) in lin.weight_t.chunks_exact(out_f).enumerate() {
                    for (r, &v) in r.iter().enumerate() {
                        weight[r * in_f + c] = v;
                    }
                }
                (weight, lin.bias.clone(), out_f, 1, in_f, None)
            } else if let Some(conv) = any.downcast_mut::<Conv2d>() {
                (
                    conv.weight.clone(),
                    conv.bias.clone(),
                    conv.out_ch,
                    conv.out_h * conv.out_w,
                    conv.in_ch * conv.k * conv.k,
                    Some(conv_geom(conv)),
                )
            } else if any.is::<BatchNorm>() {
                return Err(unexpected(format!(
                    "layer {i} ({}) does not follow a Linear or Conv2d",
                    layers[i].describe()
                )));
            } else if let Some(gn) = any.downcast_mut::<GroupNorm>() {
                let (gamma, beta) = (gn.gamma.clone(), gn.beta.clone());
                folded.push(Folded::Norm(layers[i].describe(), gamma, beta));
                i += 1;
                continue;
            } else {
                if !(any.is::<Dropout>() || any.is::<Noise>()) {
                    folded.push(Folded::Stateless(layers[i].describe()));
                }
                i += 1;
                continue;
            };
        let make = |weight: Vec<f32>, bias: Option<Vec<f32>>| match kind {
            Some(geom) => Folded::Conv { geom, weight, bias },
            None => Folded::Linear {
                in_features: row,
                out_features: out_c,
                weight,
                bias,
            },
        };
        match layers
            .get_mut(i + 1)
            .and_then(|l| l.as_any_mut().downcast_mut::<BatchNorm>())
        {
            Some(bn) => {
                if bn.c != out_c || bn.s != spatial {
                    return Err(unexpected(format!(
                        "layer {} ({}) does not normalize the {out_c} x {spatial} outputs of \
                         layer {i}",
                        i + 1,
                        bn.describe()
                    )));
                }
                let (w, b) = fold_pair(&weight, bias.as_deref(), row, bn);
                folded.push(make(w, Some(b)));
                i += 2;
            }
            None => {
                folded.push(make(weight, bias));
                i += 1;
            }
        }
    }

    let mut out = Network::build(
        &plain,
        &bn_net.input_shape,
        0,
        bn_net.max_batch(),
        bn_net.threads,
    )?;
    let mut targets: Vec<&mut dyn Layer> = Vec::new();
    out.normalization = bn_net.normalization.clone();
    leaves(&mut out.body, &mut targets);
    let targets: Vec<&mut dyn Layer> = targets
        .into_iter()
        .filter_map(|l| {
            if l.as_any_mut().is::<Dropout>() || l.as_any_mut().is::<Noise>() {
                None
            } else {
                Some(l)
            }
        })
        .collect();
    if targets.len() != folded.len() {
        return Err(unexpected(format!(
            "{} layers after folding, {} has {}",
            folded.len(),
            plain.name,
            targets.len()
        )));
    }
    for (j, (src, dst)) in folded.into_iter().zip(targets).enumerate() {
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
                        plain.name
                    )));
                };
                if (lin.in_features, lin.out_features) != (in_features, out_features)
                    || lin.bias.is_some() != bias.is_some()
                {
                    return Err(unexpected(format!(
                        "folded layer {j} is Linear({in_features}, {out_features}{}), {} has {what}",
                        if bias.is_some() { "" } else { ", bias=False" },
                        plain.name
                    )));
                }
                lin.set_weight(&weight);
                lin.bias = bias;
            }
            Folded::Conv { geom, weight, bias } => {
                let Some(conv) = dst.as_any_mut().downcast_mut::<Conv2d>() else {
                    return Err(unexpected(format!(
                        "folded layer {j} is a Conv2d, {} has {what}",
                        plain.name
                    )));
                };
                if conv_geom(conv) != geom || conv.bias.is_some() != bias.is_some() {
                    return Err(unexpected(format!(
                        "folded layer {j} is Conv2d {geom:?} (bias {}), {} has {what}",
                        bias.is_some(),
                        plain.name
                    )));
                }
                conv.weight.copy_from_slice(&weight);
                conv.bias = bias;
            }
            Folded::Norm(desc, gamma, beta) => match dst.as_any_mut().downcast_mut::<GroupNorm>() {
                Some(gn) if desc == what => {
                    gn.gamma = gamma;
                    gn.beta = beta;
                }
                _ => {
                    return Err(unexpected(format!(
                        "folded layer {j} is {desc}, {} has {what}",
                        plain.name
                    )))
                }
            },
            Folded::Stateless(desc) => {
                if desc != what {
                    return Err(unexpected(format!(
                        "folded layer {j} is {desc}, {} has {what}",
                        plain.name
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
