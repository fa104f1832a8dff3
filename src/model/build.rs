//! From a [`ModelSpec`] to layers: shapes inferred from the input shape, every inconsistency an
//! error naming the layer's place in the file, weights initialized in the tree's order from one
//! seeded generator (so a model file equal to a preset builds the same bits), and a summary row
//! per module (path, output shape, parameters, multiply-adds) for `bnlab summary`.

use super::spec::{module_path, BiasInit, Child, Init, ModelSpec, Node, WeightInit};
use crate::kernels::batch_norm::RunningAverage;
use crate::nn::{
    AvgPool2d, BatchNorm, Concat, Conv2d, Dropout, Flatten, GlobalAvgPool, GroupNorm, Layer,
    Linear, MaxPool2d, Noise, Relu, Renorm, Residual, Sequential, Sigmoid, Tanh,
};
use crate::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One module of a built network, for summaries.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryRow {
    /// Nesting depth (0 for the top-level modules).
    pub depth: usize,
    /// The module's `state_dict` path (`layer1.0.conv1`); functional calls (empty names) show
    /// their container's path.
    pub path: String,
    /// The layer kind as in the file (`Conv2d`, `Residual`, ...).
    pub kind: String,
    /// Output shape of one example.
    pub output: Vec<usize>,
    /// Trainable parameters (weights, biases, BN's gamma and beta).
    pub params: usize,
    /// Multiply-adds per example of the convolutions and linear layers inside.
    pub macs: u64,
}

/// A built network body with its shapes.
pub struct Built {
    /// The layers (buffers not sized yet: `Network::build` reserves them, or the first pass does).
    pub body: Sequential,
    /// The shape of one example at the input (`[784]`, `[1, 28, 28]`).
    pub input_shape: Vec<usize>,
    /// The shape of one example at the output (`[classes]`).
    pub output_shape: Vec<usize>,
    /// One row per module, in forward order (as `bnlab summary` prints).
    pub summary: Vec<SummaryRow>,
}

/// The concrete input shape of `spec` for examples of `data_shape` (`[C, H, W]`), or from the
/// file alone when `data_shape` is `None`. A flat input (`[784]`) takes any example with that
/// many values (a 1x28x28 image is flattened).
pub fn resolve_input(spec: &ModelSpec, data_shape: Option<&[usize]>) -> Result<Vec<usize>> {
    let model_err = |msg: String| Error::Model {
        model: spec.name.clone(),
        msg,
    };
    let fmt_spec = || {
        let dims: Vec<String> = spec
            .input
            .iter()
            .map(|d| d.map_or("any".to_string(), |v| v.to_string()))
            .collect();
        format!("[{}]", dims.join(", "))
    };
    let Some(data) = data_shape else {
        return spec
            .input
            .iter()
            .map(|d| {
                d.ok_or_else(|| {
                    model_err(format!(
                        "the input shape {} comes from the data: give --data (or a checkpoint that records the input shape)",
                        fmt_spec()
                    ))
                })
            })
            .collect();
    };
    let mismatch = || {
        Error::Shape(format!(
            "the data's examples have shape {data:?} but model '{}' takes input {}",
            spec.name,
            fmt_spec()
        ))
    };
    let total: usize = data.iter().product();
    match spec.input.as_slice() {
        [f] => match f {
            Some(f) if *f != total => Err(mismatch()),
            _ => Ok(vec![total]),
        },
        dims if dims.len() == data.len() => dims
            .iter()
            .zip(data)
            .map(|(d, &v)| match d {
                Some(d) if *d != v => Err(mismatch()),
                _ => Ok(v),
            })
            .collect(),
        _ => Err(mismatch()),
    }
}

/// Build `spec` for examples of `input` (see [`resolve_input`]) with weights from `seed`.
/// `sparse_input` lets a Linear that reads the raw input multiply through its nonzero values
/// only (images, mostly zeros).
pub fn build(spec: &ModelSpec, input: &[usize], seed: u64, sparse_input: bool) -> Result<Built> {
    if input.is_empty() || input.len() > 3 || input.contains(&0) || input.len() == 2 {
        return Err(Error::Model {
            model: spec.name.clone(),
            msg: format!("input shape {input:?}: expected [features] or [channels, height, width]"),
        });
    }
    let mut b = Builder {
        rng: ChaCha8Rng::seed_from_u64(seed),
        spec,
        rows: Vec::new(),
    };
    let (mut body, output_shape) = b.sequence(&spec.layers, "layers", "", input, 0)?;
    // Every weight first, in file order; then each dropout layer's generator, in file order.
    body.for_each_rng(&mut |rng| *rng = ChaCha8Rng::seed_from_u64(b.rng.gen()));
    if sparse_input {
        if let Some(first) = body.layers.first_mut() {
            if let Some(lin) = first.as_any_mut().downcast_mut::<Linear>() {
                lin.sparse_input = true;
            }
        }
    }
    if output_shape.len() != 1 {
        return Err(Error::Model {
            model: spec.name.clone(),
            msg: format!(
                "the network ends with shape {output_shape:?} per example; a classifier ends with [classes] (add GlobalAvgPool or Flatten and a Linear)"
            ),
        });
    }
    if output_shape[0] < 2 {
        return Err(Error::Model {
            model: spec.name.clone(),
            msg: format!(
                "the network has {} output(s); a classifier needs at least 2 classes",
                output_shape[0]
            ),
        });
    }
    Ok(Built {
        body,
        input_shape: input.to_vec(),
        output_shape,
        summary: b.rows,
    })
}

struct Builder<'a> {
    rng: ChaCha8Rng,
    spec: &'a ModelSpec,
    rows: Vec<SummaryRow>,
}

fn kind_name(node: &Node) -> &'static str {
    match node {
        Node::Sequential { .. } => "Sequential",
        Node::Linear { .. } => "Linear",
        Node::Conv2d { .. } => "Conv2d",
        Node::BatchNorm { two_d: false, .. } => "BatchNorm1d",
        Node::BatchNorm { two_d: true, .. } => "BatchNorm2d",
        Node::GroupNorm { .. } => "GroupNorm",
        Node::LayerNorm { .. } => "LayerNorm",
        Node::Relu => "ReLU",
        Node::Sigmoid => "Sigmoid",
        Node::Tanh => "Tanh",
        Node::Dropout { .. } => "Dropout",
        Node::MaxPool2d { .. } => "MaxPool2d",
        Node::AvgPool2d { .. } => "AvgPool2d",
        Node::GlobalAvgPool => "GlobalAvgPool",
        Node::Flatten => "Flatten",
        Node::Noise(_) => "Noise",
        Node::Concat { .. } => "Concat",
        Node::Residual { .. } => "Residual",
    }
}

/// Output length of a window of `k` every `s` over `len` padded by `p`, or `None` when the
/// window does not fit (the map would shrink to nothing).
fn window_out(len: usize, k: usize, s: usize, p: usize) -> Option<usize> {
    (len + 2 * p >= k && s >= 1).then(|| (len + 2 * p - k) / s + 1)
}

/// U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default for Linear and Conv2d weights
/// (`kaiming_uniform_` with a = sqrt(5)) and biases.
pub fn fill_uniform(out: &mut [f32], fan_in: usize, rng: &mut ChaCha8Rng) {
    let bound = 1.0 / (fan_in as f64).sqrt();
    for v in out {
        *v = ((rng.gen::<f64>() * 2.0 - 1.0) * bound) as f32;
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

impl Builder<'_> {
    fn err(&self, json: &str, module: &str, msg: impl std::fmt::Display) -> Error {
        let place = if module.is_empty() {
            json.to_string()
        } else {
            format!("{json} (module '{module}')")
        };
        Error::Model {
            model: self.spec.name.clone(),
            msg: format!("{place}: {msg}"),
        }
    }

    fn init_weights(
        &mut self,
        init: &Init,
        weight: &mut [f32],
        bias: Option<&mut [f32]>,
        fan_in: usize,
    ) {
        match init.weight {
            WeightInit::TorchDefault => fill_uniform(weight, fan_in, &mut self.rng),
            WeightInit::Normal(std) => fill_normal(weight, std, &mut self.rng),
        }
        if let Some(b) = bias {
            match init.bias {
                BiasInit::TorchDefault => fill_uniform(b, fan_in, &mut self.rng),
                BiasInit::Zeros => b.fill(0.0),
            }
        }
    }

    /// A container's children as one chain, named by their names (or indices).
    fn sequence(
        &mut self,
        children: &[Child],
        json: &str,
        prefix: &str,
        input: &[usize],
        depth: usize,
    ) -> Result<(Sequential, Vec<usize>)> {
        let mut shape = input.to_vec();
        let mut names: Vec<String> = Vec::with_capacity(children.len());
        let mut layers: Vec<Box<dyn Layer>> = Vec::with_capacity(children.len());
        for (i, c) in children.iter().enumerate() {
            let (layer, out) = self.child(c, &format!("{json}[{i}]"), prefix, i, &shape, depth)?;
            names.push(c.name.clone().unwrap_or_else(|| i.to_string()));
            layers.push(layer);
            shape = out;
        }
        let seq = if children.iter().any(|c| c.name.is_some()) {
            Sequential::named(names.iter().map(String::as_str).zip(layers).collect())
                .map_err(|e| self.err(json, prefix, e))?
        } else {
            Sequential::new(layers)
        };
        Ok((seq, shape))
    }

    fn child(
        &mut self,
        c: &Child,
        json: &str,
        prefix: &str,
        index: usize,
        input: &[usize],
        depth: usize,
    ) -> Result<(Box<dyn Layer>, Vec<usize>)> {
        let module = module_path(prefix, &c.name, index);
        let row = self.rows.len();
        self.rows.push(SummaryRow {
            depth,
            path: module.clone(),
            kind: kind_name(&c.node).to_string(),
            output: Vec::new(),
            params: 0,
            macs: 0,
        });
        let flat = |what: &str| -> Result<usize> {
            match input {
                [f] => Ok(*f),
                _ => Err(self.err(
                    json,
                    &module,
                    format!("{what} needs a flat input [features], got {input:?} (add Flatten or GlobalAvgPool before it)"),
                )),
            }
        };
        let map = |what: &str| -> Result<(usize, usize, usize)> {
            match input {
                [c, h, w] => Ok((*c, *h, *w)),
                _ => Err(self.err(
                    json,
                    &module,
                    format!("{what} needs feature maps [channels, height, width], got {input:?}"),
                )),
            }
        };
        let size: usize = input.iter().product();
        let (layer, out, params, macs): (Box<dyn Layer>, Vec<usize>, usize, u64) = match &c.node {
            Node::Sequential { layers } => {
                let start = self.rows.len();
                let (seq, out) =
                    self.sequence(layers, &format!("{json}.layers"), &module, input, depth + 1)?;
                let (p, m) = self.sum_rows(start, depth + 1);
                (Box::new(seq), out, p, m)
            }
            Node::Linear {
                in_features,
                out_features,
                bias,
                init,
            } => {
                let inf = flat("Linear")?;
                if let Some(s) = in_features {
                    if *s != inf {
                        return Err(self.err(
                            json,
                            &module,
                            format!("in_features is {s} but the input has {inf} features"),
                        ));
                    }
                }
                let mut lin = Linear::new(inf, *out_features, *bias);
                let init = init
                    .clone()
                    .or_else(|| self.spec.init.linear.clone())
                    .unwrap_or_default();
                let mut w = vec![0.0f32; inf * out_features];
                let mut bv = bias.then(|| vec![0.0f32; *out_features]);
                self.init_weights(&init, &mut w, bv.as_deref_mut(), inf);
                lin.set_weight(&w);
                if let (Some(dst), Some(src)) = (&mut lin.bias, bv) {
                    dst.copy_from_slice(&src);
                }
                let params = inf * out_features + if *bias { *out_features } else { 0 };
                (
                    Box::new(lin),
                    vec![*out_features],
                    params,
                    (inf * out_features) as u64,
                )
            }
            Node::Conv2d {
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                bias,
                init,
            } => {
                let (ch, h, w) = map("Conv2d")?;
                if let Some(s) = in_channels {
                    if *s != ch {
                        return Err(self.err(
                            json,
                            &module,
                            format!("in_channels is {s} but the input has {ch} channels"),
                        ));
                    }
                }
                let (k, s, p) = (*kernel_size, *stride, *padding);
                let (Some(oh), Some(ow)) = (window_out(h, k, s, p), window_out(w, k, s, p)) else {
                    return Err(self.err(
                        json,
                        &module,
                        format!("kernel {k} does not fit the {h}x{w} input with padding {p}"),
                    ));
                };
                let mut conv = Conv2d::new(ch, *out_channels, k, s, p, *bias, h, w)
                    .map_err(|e| self.err(json, &module, e))?;
                let init = init
                    .clone()
                    .or_else(|| self.spec.init.conv.clone())
                    .unwrap_or_default();
                let fan_in = ch * k * k;
                let mut wv = std::mem::take(&mut conv.weight);
                let mut bv = conv.bias.take();
                self.init_weights(&init, &mut wv, bv.as_deref_mut(), fan_in);
                conv.weight = wv;
                conv.bias = bv;
                let params = out_channels * fan_in + if *bias { *out_channels } else { 0 };
                let macs = (out_channels * oh * ow * fan_in) as u64;
                (Box::new(conv), vec![*out_channels, oh, ow], params, macs)
            }
            Node::BatchNorm {
                num_features,
                two_d,
                eps,
                momentum,
                affine,
                ghost,
                renorm,
            } => {
                let (c, s) = if *two_d {
                    let (c, h, w) = map("BatchNorm2d")?;
                    (c, h * w)
                } else {
                    (flat("BatchNorm1d")?, 1)
                };
                if let Some(nf) = num_features {
                    if *nf != c {
                        return Err(self.err(
                            json,
                            &module,
                            format!("num_features is {nf} but the input has {c}"),
                        ));
                    }
                }
                let mut bn = BatchNorm::new(c, s, *eps as f32, *affine);
                bn.running_average = match momentum {
                    Some(m) => RunningAverage::Exponential {
                        momentum: *m as f32,
                    },
                    None => RunningAverage::Cumulative,
                };
                bn.ghost = *ghost;
                bn.set_renorm(renorm.map(|r| Renorm {
                    rmax: r.rmax as f32,
                    dmax: r.dmax as f32,
                }));
                let params = if *affine { 2 * c } else { 0 };
                (Box::new(bn), input.to_vec(), params, 0)
            }
            Node::GroupNorm { .. } | Node::LayerNorm { .. } => {
                let gn = group_norm(&c.node, input).map_err(|e| self.err(json, &module, e))?;
                let params = if gn.gamma.is_some() {
                    2 * gn.channels
                } else {
                    0
                };
                (Box::new(gn), input.to_vec(), params, 0)
            }
            Node::Relu => (Box::new(Relu::new(size)), input.to_vec(), 0, 0),
            Node::Sigmoid => (Box::new(Sigmoid::new(size)), input.to_vec(), 0, 0),
            Node::Tanh => (Box::new(Tanh::new(size)), input.to_vec(), 0, 0),
            // Seeded after every weight is drawn (see `build`).
            Node::Dropout { p } => (
                Box::new(Dropout::new(size, *p as f32, 0)),
                input.to_vec(),
                0,
                0,
            ),
            // Seeded after every weight is drawn (see `build`), like Dropout.
            Node::Noise(spec) => (Box::new(Noise::new(size, *spec, 0)), input.to_vec(), 0, 0),
            Node::MaxPool2d {
                kernel_size,
                stride,
                padding,
            }
            | Node::AvgPool2d {
                kernel_size,
                stride,
                padding,
                ..
            } => {
                let what = kind_name(&c.node);
                let (ch, h, w) = map(what)?;
                let (k, s, p) = (*kernel_size, *stride, *padding);
                let (Some(oh), Some(ow)) = (window_out(h, k, s, p), window_out(w, k, s, p)) else {
                    return Err(self.err(
                        json,
                        &module,
                        format!("the {h}x{w} map pools to nothing with kernel {k} and padding {p}"),
                    ));
                };
                let layer: Box<dyn Layer> = match &c.node {
                    Node::AvgPool2d {
                        count_include_pad, ..
                    } => Box::new(
                        AvgPool2d::new(ch, k, s, p, h, w, *count_include_pad)
                            .map_err(|e| self.err(json, &module, e))?,
                    ),
                    _ => Box::new(
                        MaxPool2d::new(ch, k, s, p, h, w)
                            .map_err(|e| self.err(json, &module, e))?,
                    ),
                };
                (layer, vec![ch, oh, ow], 0, 0)
            }
            Node::GlobalAvgPool => {
                let (ch, h, w) = map("GlobalAvgPool")?;
                let pool = GlobalAvgPool::new(ch, h, w).map_err(|e| self.err(json, &module, e))?;
                (Box::new(pool), vec![ch], 0, 0)
            }
            Node::Flatten => {
                let layer: Box<dyn Layer> = match input {
                    [c, h, w] => {
                        Box::new(Flatten::new(*c, *h, *w).map_err(|e| self.err(json, &module, e))?)
                    }
                    _ => {
                        Box::new(Flatten::new(size, 1, 1).map_err(|e| self.err(json, &module, e))?)
                    }
                };
                (layer, vec![size], 0, 0)
            }
            Node::Concat { branches } => {
                let start = self.rows.len();
                let mut names: Vec<String> = Vec::new();
                let mut built: Vec<Box<dyn Layer>> = Vec::new();
                let mut shapes: Vec<Vec<usize>> = Vec::new();
                for (i, b) in branches.iter().enumerate() {
                    let bj = format!("{json}.branches[{i}]");
                    let (layer, out) = self.child(b, &bj, &module, i, input, depth + 1)?;
                    if let Some(first) = shapes.first() {
                        let same = match (first.as_slice(), out.as_slice()) {
                            ([_, h0, w0], [_, h, w]) => (h0, w0) == (h, w),
                            ([_], [_]) => true,
                            _ => false,
                        };
                        if !same {
                            return Err(self.err(&bj, &module, format!(
                                "branch output {out:?} cannot be joined on channels with the first branch's {first:?}"
                            )));
                        }
                    }
                    shapes.push(out);
                    names.push(b.name.clone().unwrap_or_else(|| i.to_string()));
                    built.push(layer);
                }
                let channels: usize = shapes.iter().map(|s| s[0]).sum();
                let mut out = shapes[0].clone();
                out[0] = channels;
                let cat = Concat::new(names.iter().map(String::as_str).zip(built).collect())
                    .map_err(|e| self.err(json, &module, e))?;
                let (p, m) = self.sum_rows(start, depth + 1);
                (Box::new(cat), out, p, m)
            }
            Node::Residual {
                layers,
                shortcut,
                relu,
            } => {
                let start = self.rows.len();
                let (main, main_out) =
                    self.sequence(layers, &format!("{json}.layers"), &module, input, depth + 1)?;
                let short = match shortcut {
                    None => {
                        if main_out.as_slice() != input {
                            return Err(self.err(json, &module, format!(
                                "the main branch turns {input:?} into {main_out:?} but the identity shortcut keeps {input:?}: give a projection shortcut"
                            )));
                        }
                        None
                    }
                    Some(s) => {
                        let sj = format!("{json}.shortcut");
                        let (layer, out) = self.child(s, &sj, &module, 0, input, depth + 1)?;
                        if out != main_out {
                            return Err(self.err(
                                &sj,
                                &module,
                                format!(
                                "the shortcut gives {out:?} but the main branch gives {main_out:?}"
                            ),
                            ));
                        }
                        Some((s.name.clone().unwrap_or_default(), layer))
                    }
                };
                let block: Box<dyn Layer> = Box::new(
                    Residual::new(main, short, *relu).map_err(|e| self.err(json, &module, e))?,
                );
                let (p, m) = self.sum_rows(start, depth + 1);
                (block, main_out, p, m)
            }
        };
        let r = &mut self.rows[row];
        r.output = out.clone();
        r.params = params;
        r.macs = macs;
        Ok((layer, out))
    }

    /// Parameters and multiply-adds of the rows at `depth` from `start` on (a container's
    /// direct children).
    fn sum_rows(&self, start: usize, depth: usize) -> (usize, u64) {
        self.rows[start..]
            .iter()
            .filter(|r| r.depth == depth)
            .fold((0, 0), |(p, m), r| (p + r.params, m + r.macs))
    }
}

/// The layer of a `GroupNorm` or `LayerNorm` node on one example of shape `input` (`[C]` or
/// `[C, H, W]`), or what is wrong with it.
fn group_norm(node: &Node, input: &[usize]) -> std::result::Result<GroupNorm, String> {
    let (c, s) = match input {
        [c] => (*c, 1),
        [c, h, w] => (*c, h * w),
        _ => {
            return Err(format!(
                "needs [features] or [channels, height, width], got {input:?}"
            ))
        }
    };
    let made = match node {
        Node::GroupNorm {
            groups,
            num_channels,
            eps,
            affine,
        } => {
            if let Some(nc) = num_channels.filter(|&nc| nc != c) {
                return Err(format!(
                    "num_channels is {nc} but the input has {c} channels"
                ));
            }
            if c % groups != 0 {
                return Err(format!(
                    "num_groups {groups} does not divide the {c} channels"
                ));
            }
            GroupNorm::group(*groups, c, s, *eps as f32, *affine)
        }
        Node::LayerNorm {
            normalized_shape,
            eps,
            affine,
        } => {
            if let Some(ns) = normalized_shape
                .as_ref()
                .filter(|ns| ns.as_slice() != input)
            {
                return Err(format!(
                    "normalized_shape is {ns:?} but the input is {input:?} (layer norm normalizes over the whole example)"
                ));
            }
            GroupNorm::layer(c, s, *eps as f32, *affine)
        }
        _ => unreachable!("group_norm is called for GroupNorm and LayerNorm nodes"),
    };
    made.map_err(|e| e.to_string())
}
