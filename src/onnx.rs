//! Export of a network's inference function as an ONNX model (ir_version 8, opset 17), so that
//! other runtimes (onnxruntime, ...) can run what bnlab trained.
//!
//! The model takes `input`, float32 `[N, ..input_shape]` (`[N, 784]` for the MLPs) with a
//! symbolic batch dimension `N`, and gives `logits`, float32 `[N, classes]`. Layers map to
//! operators as in inference mode:
//!
//! ```text
//! Linear    -> Gemm(x, W, b; transB = 1), W in PyTorch's [out, in] layout; no C without
//!              bias (preceded by Flatten when its input has more than one axis per example)
//! BatchNorm -> BatchNormalization(x, scale, B, input_mean, input_var; epsilon), i.e.
//!              y = scale (x - mean) / sqrt(var + epsilon) + B with the layer's inference
//!              statistics (running or population, see BatchNorm::inference_stats);
//!              scale = 1 and B = 0 without affine parameters
//! Sigmoid   -> Sigmoid,  ReLU -> Relu,  Dropout -> Identity
//! Conv2d    -> Conv(x, W[, b]; kernel_shape, strides, pads), W in PyTorch's [out, in, k, k]
//! MaxPool2d -> MaxPool(kernel_shape, strides, pads)
//! AvgPool2d -> AveragePool(kernel_shape, strides, pads, count_include_pad as the layer's)
//! GlobalAvgPool -> GlobalAveragePool, then Flatten(axis = 1)
//! Concat    -> each branch a chain from the block's input, then Concat(axis = 1)
//! Residual  -> the main chain and the shortcut (a chain, or the input itself), Add, [Relu]
//! Flatten   -> Flatten(axis = 1),  Tanh -> Tanh
//! ```
//!
//! A network trained on normalized inputs (`--normalize`) starts with `Sub(input, input_mean)`
//! and `Div(.., input_std)`, so the model takes raw pixels / 255 as bnlab's data sets give them.
//!
//! Initializers carry the `state_dict` names (`0.weight`, `1.input_mean`, ...) as little-endian
//! float32 `raw_data`. The protobuf encoding is written by hand (`Pb` below): the few field
//! kinds ONNX needs do not justify a code generator. A layer kind without a mapping is an
//! error naming the layer. The export walks per-example shapes (`[784]`, or `[1, 28, 28]` for the
//! convolutional presets, the network's `input_shape`). Node names follow the module tree, with
//! the child's index where a child adds no naming level (the pools); initializer names are the
//! `state_dict` names (`stem.conv.weight`, `a.b4.conv.weight`, ...).

use crate::checkpoint::write_atomic;
use crate::network::Network;
use crate::nn::named::child_prefix;
use crate::nn::{
    AvgPool2d, BatchNorm, Concat, Conv2d, Dropout, Flatten, GlobalAvgPool, GroupNorm, Layer,
    Linear, MaxPool2d, Noise, Relu, Residual, Sequential, Sigmoid, Tanh,
};
use crate::{Error, Result};
use std::path::Path;

/// ONNX format version written (IR version 8 = ONNX 1.10+).
pub const IR_VERSION: u64 = 8;
/// Version of the default operator set ("" domain) the nodes are written for.
pub const OPSET_VERSION: u64 = 17;

/// `TensorProto.DataType.FLOAT`.
const FLOAT: u64 = 1;
/// `AttributeProto.AttributeType` values.
const ATTR_FLOAT: u64 = 1;
const ATTR_INT: u64 = 2;
const ATTR_INTS: u64 = 7;

/// Write `net`'s inference function to `path` as an ONNX model, atomically.
pub fn export_onnx(net: &mut Network, path: &Path) -> Result<()> {
    let bytes = encode_model(net)?;
    write_atomic(path, &bytes)
}

/// The ONNX `ModelProto` of `net`, encoded.
pub fn encode_model(net: &mut Network) -> Result<Vec<u8>> {
    let example: Vec<usize> = net.input_shape.clone();
    if example.iter().product::<usize>() != net.body.in_size() {
        return Err(Error::Shape(format!(
            "{} takes {} features, its input shape {example:?} holds {}",
            net.name(),
            net.body.in_size(),
            example.iter().product::<usize>()
        )));
    }
    let classes = net.classes();
    let mut g = Graph {
        nodes: Vec::new(),
        initializers: Vec::new(),
        value: "input".to_string(),
        shape: example.clone(),
    };
    if let Some(norm) = &net.normalization {
        // (x - mean) / std per channel, as the data set applies it, with constants of the
        // example's shape (channel c covers a contiguous block of the example).
        let total: usize = example.iter().product();
        let channels = if example.len() == 3 {
            example[0]
        } else {
            norm.channels()
        };
        let norm = norm.for_channels(channels)?;
        let per = total / channels.max(1);
        let expand =
            |v: &[f32]| -> Vec<f32> { (0..total).map(|i| v[(i / per).min(v.len() - 1)]).collect() };
        g.initializer("input_mean", &example, &expand(&norm.mean));
        g.initializer("input_std", &example, &expand(&norm.std));
        g.node(
            "Sub",
            "normalize.sub",
            &["input", "input_mean"],
            "input.centered",
            &[],
        );
        g.node(
            "Div",
            "normalize.div",
            &["input.centered", "input_std"],
            "input.normalized",
            &[],
        );
    }
    g.sequential(&mut net.body, "", "", "logits")?;
    if g.shape != [classes] {
        return Err(Error::Shape(format!(
            "the network ends with shape {:?} per example, expected [{classes}]",
            g.shape
        )));
    }

    let mut graph = Pb::default();
    for n in &g.nodes {
        graph.message(1, n);
    }
    graph.string(2, net.name());
    for t in &g.initializers {
        graph.message(5, t);
    }
    graph.message(11, &value_info("input", &example));
    graph.message(12, &value_info("logits", &[classes]));

    let mut opset = Pb::default();
    opset.string(1, "");
    opset.varint(2, OPSET_VERSION);

    let mut model = Pb::default();
    model.varint(1, IR_VERSION);
    model.string(2, "bnlab");
    model.string(3, env!("CARGO_PKG_VERSION"));
    model.message(7, &graph);
    model.message(8, &opset);
    Ok(model.buf)
}

/// Nodes and initializers built so far, and the value the next layer reads with its shape per
/// example (without the batch dimension).
struct Graph {
    nodes: Vec<Pb>,
    initializers: Vec<Pb>,
    value: String,
    shape: Vec<usize>,
}

/// A node attribute.
enum Attr {
    Int(i64),
    Float(f32),
    Ints(Vec<i64>),
}

impl Graph {
    /// The layers of `seq` in order; `out` names the last one's output. Child `i` is named
    /// `{prefix}{child name}` (its index for an empty name, which keeps node names unique);
    /// initializers get the `state_dict` names, under `state` (empty or ending with a dot).
    fn sequential(
        &mut self,
        seq: &mut Sequential,
        prefix: &str,
        state: &str,
        out: &str,
    ) -> Result<()> {
        let last = seq.layers.len().saturating_sub(1);
        let names = seq.child_names();
        for (i, layer) in seq.layers.iter_mut().enumerate() {
            let n = &names[i];
            let name = if n.is_empty() {
                format!("{prefix}{i}")
            } else {
                format!("{prefix}{n}")
            };
            let st = child_prefix(state, n);
            let output = if i == last {
                out.to_string()
            } else {
                format!("{name}.output")
            };
            self.layer(layer.as_mut(), &name, &st, &output)?;
        }
        Ok(())
    }

    /// Each branch reads the block's input; the outputs are concatenated on channels.
    fn concat(&mut self, cat: &mut Concat, name: &str, state: &str, out: &str) -> Result<()> {
        let input = std::mem::take(&mut self.value);
        let in_shape = self.shape.clone();
        let mut outputs = Vec::new();
        let mut channels = 0;
        let mut hw: Option<Vec<usize>> = None;
        for (i, branch) in cat.branches.iter_mut().enumerate() {
            let n = &cat.names[i];
            let b_name = if n.is_empty() {
                format!("{name}.{i}")
            } else {
                format!("{name}.{n}")
            };
            let b_out = format!("{b_name}.output");
            self.value = input.clone();
            self.shape = in_shape.clone();
            self.layer(branch.as_mut(), &b_name, &child_prefix(state, n), &b_out)?;
            if self.shape.len() != 3 || hw.as_ref().is_some_and(|h| h[..] != self.shape[1..]) {
                return Err(Error::Shape(format!(
                    "branch {b_name} of {name} gives {:?} per example",
                    self.shape
                )));
            }
            channels += self.shape[0];
            hw = Some(self.shape[1..].to_vec());
            outputs.push(b_out);
        }
        let refs: Vec<&str> = outputs.iter().map(String::as_str).collect();
        self.node("Concat", name, &refs, out, &[("axis", Attr::Int(1))]);
        let hw = hw.unwrap_or_default();
        self.shape = vec![channels, hw[0], hw[1]];
        Ok(())
    }

    /// A residual block: the main branch and the shortcut (a projection, or the input itself)
    /// both read the block's input; `Add`, then `Relu` when the block has one.
    fn residual(&mut self, res: &mut Residual, name: &str, state: &str, out: &str) -> Result<()> {
        let input = self.value.clone();
        let in_shape = self.shape.clone();
        let relu = res.has_relu();
        let main_out = format!("{name}.main");
        self.sequential(res.main(), &format!("{name}."), state, &main_out)?;
        let main_shape = self.shape.clone();
        let short_out = match res.shortcut() {
            Some((s_name, layer)) => {
                self.value = input;
                self.shape = in_shape;
                let s_out = format!("{name}.{s_name}.output");
                self.layer(
                    layer,
                    &format!("{name}.{s_name}"),
                    &child_prefix(state, s_name),
                    &s_out,
                )?;
                s_out
            }
            None => {
                self.shape = in_shape;
                input
            }
        };
        if self.shape != main_shape {
            return Err(Error::Shape(format!(
                "residual block {name}: main branch gives {main_shape:?}, shortcut {:?}",
                self.shape
            )));
        }
        let sum = if relu {
            format!("{name}.sum")
        } else {
            out.to_string()
        };
        self.node(
            "Add",
            &format!("{name}.add"),
            &[&main_out, &short_out],
            &sum,
            &[],
        );
        if relu {
            self.node("Relu", &format!("{name}.relu"), &[&sum], out, &[]);
        }
        self.value = out.to_string();
        Ok(())
    }

    /// `[c, h, w]` per example, or a shape error naming the layer.
    fn maps(&self, name: &str, desc: &str, c: usize) -> Result<(usize, usize)> {
        match self.shape[..] {
            [ch, h, w] if ch == c => Ok((h, w)),
            _ => Err(Error::Shape(format!(
                "layer {name} ({desc}) receives {:?} per example",
                self.shape
            ))),
        }
    }

    fn conv(&mut self, conv: &Conv2d, name: &str, state: &str, out: &str) -> Result<()> {
        let (h, w) = self.maps(name, &Layer::describe(conv), conv.in_ch)?;
        if (h, w) != (conv.in_h, conv.in_w) {
            return Err(Error::Shape(format!(
                "layer {name} takes {}x{} maps, receives {h}x{w}",
                conv.in_h, conv.in_w
            )));
        }
        let w_name = format!("{state}weight");
        self.initializer(
            &w_name,
            &[conv.out_ch, conv.in_ch, conv.k, conv.k],
            &conv.weight,
        );
        let mut inputs = vec![std::mem::take(&mut self.value), w_name];
        if let Some(b) = &conv.bias {
            let b_name = format!("{state}bias");
            self.initializer(&b_name, &[conv.out_ch], b);
            inputs.push(b_name);
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        let (k, s, p) = (conv.k as i64, conv.stride as i64, conv.padding as i64);
        self.node(
            "Conv",
            name,
            &refs,
            out,
            &[
                ("kernel_shape", Attr::Ints(vec![k, k])),
                ("strides", Attr::Ints(vec![s, s])),
                ("pads", Attr::Ints(vec![p, p, p, p])),
            ],
        );
        self.shape = vec![conv.out_ch, conv.out_h, conv.out_w];
        Ok(())
    }

    /// MaxPool or AveragePool (`count_include_pad` given for the latter) with a square window.
    #[allow(clippy::too_many_arguments)]
    fn pool(
        &mut self,
        op: &str,
        name: &str,
        desc: &str,
        geom: (usize, usize, usize, usize),
        out_hw: (usize, usize),
        count_include_pad: Option<bool>,
        out: &str,
    ) -> Result<()> {
        let (k, s, p, c) = geom;
        self.maps(name, desc, c)?;
        let input = std::mem::take(&mut self.value);
        let (k, s, p) = (k as i64, s as i64, p as i64);
        let mut attrs = vec![
            ("kernel_shape", Attr::Ints(vec![k, k])),
            ("strides", Attr::Ints(vec![s, s])),
            ("pads", Attr::Ints(vec![p, p, p, p])),
        ];
        if let Some(include) = count_include_pad {
            attrs.push(("count_include_pad", Attr::Int(i64::from(include))));
        }
        self.node(op, name, &[&input], out, &attrs);
        self.shape = vec![c, out_hw.0, out_hw.1];
        Ok(())
    }

    /// The nodes of one layer, reading `self.value` and writing `out`; `state` is the
    /// layer's `state_dict` prefix (empty or ending with a dot).
    fn layer(&mut self, layer: &mut dyn Layer, name: &str, state: &str, out: &str) -> Result<()> {
        let desc = layer.describe();
        let any = layer.as_any_mut();
        if let Some(seq) = any.downcast_mut::<Sequential>() {
            return self.sequential(seq, &format!("{name}."), state, out);
        }
        if let Some(cat) = any.downcast_mut::<Concat>() {
            return self.concat(cat, name, state, out);
        }
        if let Some(res) = any.downcast_mut::<Residual>() {
            return self.residual(res, name, state, out);
        }
        if any.is::<Flatten>() {
            let input = std::mem::take(&mut self.value);
            self.node("Flatten", name, &[&input], out, &[("axis", Attr::Int(1))]);
            self.shape = vec![self.shape.iter().product()];
            return Ok(());
        }
        if let Some(lin) = any.downcast_mut::<Linear>() {
            return self.linear(lin, name, state, out);
        }
        if let Some(bn) = any.downcast_mut::<BatchNorm>() {
            return self.batch_norm(bn, name, state, out);
        }
        if let Some(conv) = any.downcast_mut::<Conv2d>() {
            return self.conv(conv, name, state, out);
        }
        if let Some(mp) = any.downcast_mut::<MaxPool2d>() {
            let (g, o) = (mp.geometry(), mp.out_hw());
            return self.pool("MaxPool", name, &desc, g, o, None, out);
        }
        if let Some(ap) = any.downcast_mut::<AvgPool2d>() {
            let (g, o, inc) = (ap.geometry(), ap.out_hw(), ap.count_include_pad());
            return self.pool("AveragePool", name, &desc, g, o, Some(inc), out);
        }
        if any.is::<GroupNorm>() {
            // ONNX's GroupNormalization (opset 18, 21) and LayerNormalization (opset 17) do not
            // both fit opset 17 with per-channel scales; refused rather than exported wrongly.
            return Err(Error::config(
                "model",
                format!(
                    "ONNX export does not support group or layer normalization yet: layer {name} ({desc})"
                ),
            ));
        }
        if let Some(gap) = any.downcast_mut::<GlobalAvgPool>() {
            let c = gap.c;
            self.maps(name, &desc, c)?;
            let input = std::mem::take(&mut self.value);
            let pooled = format!("{name}.pooled");
            self.node("GlobalAveragePool", name, &[&input], &pooled, &[]);
            self.node(
                "Flatten",
                &format!("{name}.flatten"),
                &[&pooled],
                out,
                &[("axis", Attr::Int(1))],
            );
            self.shape = vec![c];
            return Ok(());
        }
        let op = if any.is::<Sigmoid>() {
            "Sigmoid"
        } else if any.is::<Tanh>() {
            "Tanh"
        } else if any.is::<Relu>() {
            "Relu"
        } else if any.is::<Dropout>() || any.is::<Noise>() {
            // Inverted dropout and noisy BN's noise are the identity at inference.
            "Identity"
        } else {
            return Err(Error::config(
                "model",
                format!("ONNX export has no mapping for layer {name} ({desc})"),
            ));
        };
        let input = std::mem::take(&mut self.value);
        self.node(op, name, &[&input], out, &[]);
        Ok(())
    }

    fn linear(&mut self, lin: &Linear, name: &str, state: &str, out: &str) -> Result<()> {
        let (i, o) = (lin.in_features, lin.out_features);
        let features: usize = self.shape.iter().product();
        if features != i {
            return Err(Error::Shape(format!(
                "layer {name} ({}) receives {:?} = {features} features per example",
                Layer::describe(lin),
                self.shape
            )));
        }
        if self.shape.len() != 1 {
            // Feature maps [C, H, W] become rows of C*H*W, as `nn.Flatten` does.
            let input = std::mem::take(&mut self.value);
            let flat = format!("{name}.flatten");
            self.node(
                "Flatten",
                &format!("{name}.flatten"),
                &[&input],
                &flat,
                &[("axis", Attr::Int(1))],
            );
            self.value = flat;
        }
        // PyTorch's [out, in] from the stored [in, out].
        let mut w = vec![0.0f32; i * o];
        for (c, row) in lin.weight_t.chunks_exact(o).enumerate() {
            for (r, &v) in row.iter().enumerate() {
                w[r * i + c] = v;
            }
        }
        let w_name = format!("{state}weight");
        self.initializer(&w_name, &[o, i], &w);
        let mut inputs = vec![std::mem::take(&mut self.value), w_name];
        if let Some(b) = &lin.bias {
            let b_name = format!("{state}bias");
            self.initializer(&b_name, &[o], b);
            inputs.push(b_name);
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.node("Gemm", name, &refs, out, &[("transB", Attr::Int(1))]);
        self.shape = vec![o];
        Ok(())
    }

    fn batch_norm(&mut self, bn: &BatchNorm, name: &str, state: &str, out: &str) -> Result<()> {
        // Channels first: [C] for s = 1, [C, H, W] with H W = s for feature maps.
        let fits = self.shape.first() == Some(&bn.c)
            && self.shape.iter().product::<usize>() == bn.c * bn.s
            && (bn.s != 1 || self.shape.len() == 1);
        if !fits {
            return Err(Error::Shape(format!(
                "layer {name} ({}) receives {:?} per example",
                Layer::describe(bn),
                self.shape
            )));
        }
        let (mean, var) = bn.inference_stats();
        let ones = vec![1.0f32; bn.c];
        let zeros = vec![0.0f32; bn.c];
        let tensors = [
            ("weight", bn.gamma.as_deref().unwrap_or(&ones)),
            ("bias", bn.beta.as_deref().unwrap_or(&zeros)),
            ("input_mean", mean),
            ("input_var", var),
        ];
        let mut inputs = vec![std::mem::take(&mut self.value)];
        for (suffix, values) in tensors {
            let t_name = format!("{state}{suffix}");
            self.initializer(&t_name, &[bn.c], values);
            inputs.push(t_name);
        }
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.node(
            "BatchNormalization",
            name,
            &refs,
            out,
            &[("epsilon", Attr::Float(bn.eps))],
        );
        Ok(())
    }

    /// A `NodeProto`; its output becomes the current value.
    fn node(&mut self, op: &str, name: &str, inputs: &[&str], out: &str, attrs: &[(&str, Attr)]) {
        let mut n = Pb::default();
        for i in inputs {
            n.string(1, i);
        }
        n.string(2, out);
        n.string(3, name);
        n.string(4, op);
        for (a_name, a) in attrs {
            let mut p = Pb::default();
            p.string(1, a_name);
            match *a {
                Attr::Float(f) => {
                    p.float(2, f);
                    p.varint(20, ATTR_FLOAT);
                }
                Attr::Int(v) => {
                    p.varint(3, v as u64);
                    p.varint(20, ATTR_INT);
                }
                Attr::Ints(ref vs) => {
                    for &v in vs {
                        p.varint(8, v as u64);
                    }
                    p.varint(20, ATTR_INTS);
                }
            }
            n.message(5, &p);
        }
        self.nodes.push(n);
        self.value = out.to_string();
    }

    /// A float32 `TensorProto` with `raw_data`.
    fn initializer(&mut self, name: &str, dims: &[usize], values: &[f32]) {
        let mut t = Pb::default();
        t.packed_varints(1, dims.iter().map(|&d| d as u64));
        t.varint(2, FLOAT);
        t.string(8, name);
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        t.bytes(9, &raw);
        self.initializers.push(t);
    }
}

/// A `ValueInfoProto` for a float32 tensor of shape `[N, ..example]`.
fn value_info(name: &str, example: &[usize]) -> Pb {
    let mut shape = Pb::default();
    let mut batch = Pb::default();
    batch.string(2, "N");
    shape.message(1, &batch);
    for &d in example {
        let mut dim = Pb::default();
        dim.varint(1, d as u64);
        shape.message(1, &dim);
    }
    let mut tensor = Pb::default();
    tensor.varint(1, FLOAT);
    tensor.message(2, &shape);
    let mut ty = Pb::default();
    ty.message(1, &tensor);
    let mut v = Pb::default();
    v.string(1, name);
    v.message(2, &ty);
    v
}

/// A protobuf message being written: fields appended in order, each a key
/// `(field << 3) | wire_type` and a value (varint, 32-bit, or length-delimited).
#[derive(Default)]
struct Pb {
    buf: Vec<u8>,
}

impl Pb {
    fn raw_varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }
    fn key(&mut self, field: u32, wire: u8) {
        self.raw_varint(((field as u64) << 3) | wire as u64);
    }
    fn varint(&mut self, field: u32, v: u64) {
        self.key(field, 0);
        self.raw_varint(v);
    }
    fn float(&mut self, field: u32, v: f32) {
        self.key(field, 5);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.key(field, 2);
        self.raw_varint(b.len() as u64);
        self.buf.extend_from_slice(b);
    }
    fn string(&mut self, field: u32, s: &str) {
        self.bytes(field, s.as_bytes());
    }
    fn message(&mut self, field: u32, m: &Pb) {
        self.bytes(field, &m.buf);
    }
    fn packed_varints(&mut self, field: u32, values: impl Iterator<Item = u64>) {
        let mut p = Pb::default();
        for v in values {
            p.raw_varint(v);
        }
        self.bytes(field, &p.buf);
    }
}

#[cfg(test)]
mod tests {
    use super::Pb;

    #[test]
    fn varints_and_keys_encode_as_protobuf() {
        let mut p = Pb::default();
        p.varint(1, 300);
        assert_eq!(p.buf, [0x08, 0xac, 0x02]);
        let mut p = Pb::default();
        p.string(2, "ab");
        assert_eq!(p.buf, [0x12, 2, b'a', b'b']);
        let mut p = Pb::default();
        p.varint(20, 1);
        assert_eq!(p.buf, [0xa0, 0x01, 0x01]);
        let mut p = Pb::default();
        p.float(2, 1.0);
        assert_eq!(p.buf, [0x15, 0x00, 0x00, 0x80, 0x3f]);
        let mut p = Pb::default();
        p.varint(3, -1i64 as u64);
        assert_eq!(p.buf.len(), 11, "negative int64 takes ten varint bytes");
    }
}
