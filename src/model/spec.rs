//! The model file format: a JSON tree of modules written the way a PyTorch user writes them, so
//! that `state_dict` names come out the same. docs/models.md is the user's reference; this
//! module parses a file into a [`ModelSpec`] and writes one back.
//!
//! Parsing walks the JSON by hand rather than through serde's derive, so that every error can
//! name where it is: the JSON location (`layers[2].branches[1]`) and the module's `state_dict`
//! path (`a.b2`). Unknown keys and unknown layer kinds are errors, never ignored.

use crate::{Error, Result};
use serde_json::{Map, Value};

/// How a weight tensor is initialized.
#[derive(Clone, Debug, PartialEq)]
pub enum WeightInit {
    /// PyTorch's default for Linear and Conv2d: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    /// (`kaiming_uniform_` with a = sqrt(5)).
    TorchDefault,
    /// N(0, std^2), as the paper's Figure 1 networks.
    Normal(f64),
}

/// How a bias is initialized.
#[derive(Clone, Debug, PartialEq)]
pub enum BiasInit {
    /// PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    TorchDefault,
    /// All zeros.
    Zeros,
}

/// The initialization of one layer kind (or one layer).
#[derive(Clone, Debug, PartialEq)]
pub struct Init {
    /// How the weight is drawn.
    pub weight: WeightInit,
    /// How the bias is drawn.
    pub bias: BiasInit,
}

impl Default for Init {
    fn default() -> Self {
        Init {
            weight: WeightInit::TorchDefault,
            bias: BiasInit::TorchDefault,
        }
    }
}

/// Initialization per layer kind; `None` is PyTorch's default.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct InitSpec {
    /// For every `Linear` without its own `init`.
    pub linear: Option<Init>,
    /// For every `Conv2d` without its own `init`.
    pub conv: Option<Init>,
}

/// A child of a container: its `state_dict` name and what it is. `name: None` is the child's
/// index in its container (PyTorch's `nn.Sequential` numbering); `Some("")` adds no naming
/// level, for computations a `forward` makes outside any submodule (`F.relu`, `F.avg_pool2d`).
#[derive(Clone, Debug, PartialEq)]
pub struct Child {
    /// The `state_dict` name (see above).
    pub name: Option<String>,
    /// The module.
    pub node: Node,
}

/// Batch renormalization's final limits (Ioffe 2017): r in `[1/rmax, rmax]`, d in
/// `[-dmax, dmax]`. Training relaxes them from 1 and 0 on a schedule (`RenormSchedule`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RenormSpec {
    /// At least 1 (default 3, the paper's).
    pub rmax: f64,
    /// At least 0 (default 5, the paper's).
    pub dmax: f64,
}

/// One module of the tree. Sizes that follow from the input (in_features, in_channels,
/// num_features) are inferred; when a file gives them they must agree.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    /// `nn.Sequential`: the children in order.
    Sequential {
        /// The children, in forward order.
        layers: Vec<Child>,
    },
    /// `nn.Linear`: `[F]` -> `[out_features]`.
    Linear {
        /// As stated in the file (checked against the input), if given.
        in_features: Option<usize>,
        /// Features out.
        out_features: usize,
        /// Whether there is a bias (PyTorch's default true).
        bias: bool,
        /// This layer's initialization, over the file's per-kind default.
        init: Option<Init>,
    },
    /// `nn.Conv2d` with a square kernel: `[C, H, W]` -> `[out_channels, H', W']`.
    Conv2d {
        /// As stated in the file (checked against the input), if given.
        in_channels: Option<usize>,
        /// Filters, channels out.
        out_channels: usize,
        /// Kernel height and width.
        kernel_size: usize,
        /// Stride along both axes (default 1).
        stride: usize,
        /// Zero padding on each side (default 0).
        padding: usize,
        /// Whether there is a bias (PyTorch's default true).
        bias: bool,
        /// This layer's initialization, over the file's per-kind default.
        init: Option<Init>,
    },
    /// `BatchNorm1d` (`two_d == false`, on `[F]`) or `BatchNorm2d` (on `[C, H, W]`).
    BatchNorm {
        /// As stated in the file (checked against the input), if given.
        num_features: Option<usize>,
        /// `BatchNorm2d` (per channel) rather than `BatchNorm1d`.
        two_d: bool,
        /// Added to the variance (default 1e-5).
        eps: f64,
        /// PyTorch's momentum; `None` is `momentum=None`, the cumulative average.
        momentum: Option<f64>,
        /// Whether gamma and beta are learned (default true).
        affine: bool,
        /// Ghost batch normalization: training statistics over virtual batches of this many
        /// examples (`"ghost_batch_size"`); `None`: the whole mini-batch.
        ghost: Option<usize>,
        /// Batch renormalization (`"renorm": true`, with `"rmax"` and `"dmax"`), `None` for
        /// plain batch normalization.
        renorm: Option<RenormSpec>,
    },
    /// `nn.GroupNorm(groups, C)` on `[C, H, W]` or `[C]`: per example over each group of
    /// `C / groups` consecutive channels and their positions; per-channel affine (`weight`,
    /// `bias`); no running statistics.
    GroupNorm {
        /// Groups (`num_groups`); must divide the channels.
        groups: usize,
        /// As stated in the file (checked against the input), if given.
        num_channels: Option<usize>,
        /// Added to the variance (default 1e-5).
        eps: f64,
        /// Whether gamma and beta are learned (default true).
        affine: bool,
    },
    /// Layer normalization: on `[F]` PyTorch's `nn.LayerNorm(F)`; on `[C, H, W]` over C, H, W
    /// of each example with a per-channel affine (group norm with one group, Wu & He 2018;
    /// PyTorch's `nn.LayerNorm([C, H, W])` would learn one gamma per value).
    LayerNorm {
        /// As stated in the file (checked against the input shape: `[F]`, or `[C, H, W]`), if
        /// given.
        normalized_shape: Option<Vec<usize>>,
        /// Added to the variance (default 1e-5).
        eps: f64,
        /// Whether gamma and beta are learned (`elementwise_affine`, default true).
        affine: bool,
    },
    /// `nn.ReLU`, on any shape.
    Relu,
    /// `nn.Sigmoid`, on any shape.
    Sigmoid,
    /// `nn.Tanh`, on any shape.
    Tanh,
    /// `nn.Dropout`: the identity at inference.
    Dropout {
        /// The probability of dropping a value (default 0.5).
        p: f64,
    },
    /// "Noisy BN"'s noise (Santurkar et al. 2018, see [`crate::nn::noise`]): in training,
    /// `s * a + m` with a shift and a scale drawn per step and per value; the identity at
    /// inference. Any shape.
    Noise(crate::nn::NoiseSpec),
    /// `nn.MaxPool2d` on `[C, H, W]`.
    MaxPool2d {
        /// Window height and width.
        kernel_size: usize,
        /// Stride (default: the kernel size).
        stride: usize,
        /// Padding of -inf on each side, at most half the kernel (default 0).
        padding: usize,
    },
    /// `nn.AvgPool2d` on `[C, H, W]`.
    AvgPool2d {
        /// Window height and width.
        kernel_size: usize,
        /// Stride (default: the kernel size).
        stride: usize,
        /// Zero padding on each side, at most half the kernel (default 0).
        padding: usize,
        /// Whether the padding counts in each window's divisor (default true).
        count_include_pad: bool,
    },
    /// The mean over all positions of each channel (`x.mean((2, 3))`): `[C, H, W]` -> `[C]`.
    GlobalAvgPool,
    /// `[C, H, W]` -> `[C*H*W]`.
    Flatten,
    /// Parallel branches on the same input, joined on channels (`torch.cat(.., 1)`).
    Concat {
        /// The branches in concatenation order, each named.
        branches: Vec<Child>,
    },
    /// `act(main(x) + shortcut(x))`: `layers` is the main branch, whose children are named at
    /// the block's own level (`conv1`, `bn1`, ...); `shortcut` is `None` for the identity.
    Residual {
        /// The main branch.
        layers: Vec<Child>,
        /// The projection, one named child; `None` for the identity.
        shortcut: Option<Box<Child>>,
        /// Whether a ReLU follows the sum (default true).
        relu: bool,
    },
}

/// A whole model file.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// The model's name, recorded in checkpoints (default: the file's stem).
    pub name: String,
    /// Free text for `bnlab models`.
    pub description: String,
    /// The shape of one example; `None` entries come from the data (`[null, null, null]`:
    /// any image size and channel count).
    pub input: Vec<Option<usize>>,
    /// Initialization per layer kind.
    pub init: InitSpec,
    /// The data set the model was made for (`mnist`, `fashion-mnist`, `cifar10`): used when
    /// the user names none.
    pub dataset: Option<String>,
    /// The top-level `nn.Sequential`'s children.
    pub layers: Vec<Child>,
}

/// Where in the file a value is, for errors: the JSON location and the module path.
#[derive(Clone)]
struct Loc {
    json: String,
    module: String,
}

impl Loc {
    fn describe(&self) -> String {
        if self.module.is_empty() {
            self.json.clone()
        } else {
            format!("{} (module '{}')", self.json, self.module)
        }
    }
}

fn err(source: &str, loc: &Loc, msg: impl std::fmt::Display) -> Error {
    Error::Model {
        model: source.to_string(),
        msg: format!("{}: {msg}", loc.describe()),
    }
}

/// An object being read: records which keys were used so that the rest can be refused.
struct Obj<'a> {
    map: &'a Map<String, Value>,
    used: Vec<&'static str>,
    /// A required key found missing; reported by `finish` unless an unknown key (likely its
    /// misspelling) is reported first.
    missing: Option<String>,
    loc: Loc,
    source: &'a str,
    kind: &'a str,
}

impl<'a> Obj<'a> {
    fn new(v: &'a Value, loc: Loc, source: &'a str, kind: &'a str) -> Result<Obj<'a>> {
        match v {
            Value::Object(map) => Ok(Obj {
                map,
                used: Vec::new(),
                missing: None,
                loc,
                source,
                kind,
            }),
            other => Err(err(
                source,
                &loc,
                format!("expected an object, found {}", json_kind(other)),
            )),
        }
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.push(key);
        self.map.get(key)
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        err(self.source, &self.loc, msg)
    }

    fn usize_or(&mut self, key: &'static str, default: Option<usize>) -> Result<usize> {
        match self.get(key) {
            None | Some(Value::Null) => match default {
                Some(d) => Ok(d),
                None => {
                    if self.missing.is_none() {
                        self.missing =
                            Some(format!("{} needs '{key}' (a positive integer)", self.kind));
                    }
                    Ok(1)
                }
            },
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if v <= u32::MAX as u64 => Ok(v as usize),
                _ => Err(self.err(format!("'{key}' must be a non-negative integer, found {n}"))),
            },
            Some(other) => Err(self.err(format!(
                "'{key}' must be an integer, found {}",
                json_kind(other)
            ))),
        }
    }

    fn positive(&mut self, key: &'static str, default: Option<usize>) -> Result<usize> {
        let v = self.usize_or(key, default)?;
        if v == 0 {
            return Err(self.err(format!("'{key}' must be at least 1")));
        }
        Ok(v)
    }

    /// An optional size that, when given, must equal `inferred` (checked by the builder).
    fn optional_usize(&mut self, key: &'static str) -> Result<Option<usize>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(_) => {
                self.used.pop();
                self.usize_or(key, None).map(Some)
            }
        }
    }

    fn bool_or(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.err(format!(
                "'{key}' must be true or false, found {}",
                json_kind(other)
            ))),
        }
    }

    fn f64_or(&mut self, key: &'static str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or_else(|| self.err(format!("'{key}' must be a finite number"))),
            Some(other) => Err(self.err(format!(
                "'{key}' must be a number, found {}",
                json_kind(other)
            ))),
        }
    }

    fn string_or(&mut self, key: &'static str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(self.err(format!(
                "'{key}' must be a string, found {}",
                json_kind(other)
            ))),
        }
    }

    /// Refuse keys that were not read, then a missing required key.
    fn finish(self) -> Result<()> {
        if let Some(k) = self.map.keys().find(|k| !self.used.contains(&k.as_str())) {
            let mut known: Vec<&str> = self.used.clone();
            known.sort_unstable();
            known.dedup();
            return Err(self.err(format!(
                "unknown key '{k}' for {} (known: {})",
                self.kind,
                known.join(", ")
            )));
        }
        if let Some(m) = &self.missing {
            return Err(self.err(m));
        }
        Ok(())
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The layer kinds a file may name, for errors and docs.
pub const LAYER_KINDS: &[&str] = &[
    "Sequential",
    "Linear",
    "Conv2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "GroupNorm",
    "LayerNorm",
    "ReLU",
    "Sigmoid",
    "Tanh",
    "Dropout",
    "Noise",
    "MaxPool2d",
    "AvgPool2d",
    "GlobalAvgPool",
    "Flatten",
    "Concat",
    "Residual",
];

impl ModelSpec {
    /// Parse a model file's text; `source` names the file (or preset) in errors.
    pub fn parse(text: &str, source: &str) -> Result<ModelSpec> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::Model {
            model: source.to_string(),
            msg: format!("not valid JSON: {e}"),
        })?;
        let loc = Loc {
            json: "the top level".into(),
            module: String::new(),
        };
        let mut o = Obj::new(&root, loc, source, "a model file")?;
        let name = o.string_or("name", "")?;
        let description = o.string_or("description", "")?;
        let input = match o.get("input") {
            Some(Value::Array(dims)) if !dims.is_empty() && dims.len() <= 3 => dims
                .iter()
                .map(|d| match d {
                    Value::Null => Ok(None),
                    Value::Number(n) => match n.as_u64() {
                        Some(v) if v >= 1 && v <= u32::MAX as u64 => Ok(Some(v as usize)),
                        _ => Err(o.err("'input' sizes must be positive integers or null")),
                    },
                    _ => Err(o.err("'input' sizes must be positive integers or null")),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(_) => {
                return Err(o.err(
                    "'input' must be the shape of one example: [features] or [channels, height, width] (null entries come from the data)",
                ))
            }
            None => {
                return Err(o.err(
                    "a model file needs 'input', the shape of one example, e.g. [784] or [1, 28, 28]",
                ))
            }
        };
        let dataset = match o.get("dataset") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => Some(d.clone()),
            Some(_) => return Err(o.err("'dataset' must be a data set's name, e.g. \"mnist\"")),
        };
        let init = match o.get("init") {
            None => InitSpec::default(),
            Some(v) => parse_init_spec(v, source)?,
        };
        let layers = match o.get("layers") {
            Some(v) => parse_children(v, "layers", "", source)?,
            None => return Err(o.err("a model file needs 'layers', the top-level modules")),
        };
        o.finish()?;
        if layers.is_empty() {
            return Err(Error::Model {
                model: source.to_string(),
                msg: "'layers' is empty".into(),
            });
        }
        Ok(ModelSpec {
            name,
            description,
            input,
            init,
            dataset,
            layers,
        })
    }

    /// True when some layer is a BatchNorm.
    pub fn has_batch_norm(&self) -> bool {
        fn any(children: &[Child]) -> bool {
            children.iter().any(|c| match &c.node {
                Node::BatchNorm { .. } => true,
                Node::Sequential { layers } => any(layers),
                Node::Concat { branches } => any(branches),
                Node::Residual {
                    layers, shortcut, ..
                } => any(layers) || shortcut.as_ref().is_some_and(|s| any(&[(**s).clone()])),
                _ => false,
            })
        }
        any(&self.layers)
    }

    /// The file as JSON (the same tree, with every default written out).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("name".into(), self.name.clone().into());
        if !self.description.is_empty() {
            m.insert("description".into(), self.description.clone().into());
        }
        m.insert(
            "input".into(),
            Value::Array(
                self.input
                    .iter()
                    .map(|d| d.map_or(Value::Null, |v| v.into()))
                    .collect(),
            ),
        );
        if let Some(d) = &self.dataset {
            m.insert("dataset".into(), d.clone().into());
        }
        let mut init = Map::new();
        if let Some(i) = &self.init.linear {
            init.insert("Linear".into(), init_json(i));
        }
        if let Some(i) = &self.init.conv {
            init.insert("Conv2d".into(), init_json(i));
        }
        if !init.is_empty() {
            m.insert("init".into(), Value::Object(init));
        }
        m.insert("layers".into(), children_json(&self.layers));
        Value::Object(m)
    }
}

fn init_json(i: &Init) -> Value {
    let w = match i.weight {
        WeightInit::TorchDefault => Value::from("default"),
        WeightInit::Normal(std) => serde_json::json!({ "normal": std }),
    };
    let b = match i.bias {
        BiasInit::TorchDefault => "default",
        BiasInit::Zeros => "zeros",
    };
    serde_json::json!({ "weight": w, "bias": b })
}

fn children_json(children: &[Child]) -> Value {
    Value::Array(children.iter().map(child_json).collect())
}

fn child_json(c: &Child) -> Value {
    let mut m = Map::new();
    if let Some(n) = &c.name {
        m.insert("name".into(), n.clone().into());
    }
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    match &c.node {
        Node::Sequential { layers } => {
            put("type", "Sequential".into());
            put("layers", children_json(layers));
        }
        Node::Linear {
            in_features,
            out_features,
            bias,
            init,
        } => {
            put("type", "Linear".into());
            if let Some(v) = in_features {
                put("in_features", (*v).into());
            }
            put("out_features", (*out_features).into());
            put("bias", (*bias).into());
            if let Some(i) = init {
                put("init", init_json(i));
            }
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
            put("type", "Conv2d".into());
            if let Some(v) = in_channels {
                put("in_channels", (*v).into());
            }
            put("out_channels", (*out_channels).into());
            put("kernel_size", (*kernel_size).into());
            put("stride", (*stride).into());
            put("padding", (*padding).into());
            put("bias", (*bias).into());
            if let Some(i) = init {
                put("init", init_json(i));
            }
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
            put(
                "type",
                if *two_d { "BatchNorm2d" } else { "BatchNorm1d" }.into(),
            );
            if let Some(v) = num_features {
                put("num_features", (*v).into());
            }
            put("eps", (*eps).into());
            put("momentum", momentum.map_or(Value::Null, Value::from));
            put("affine", (*affine).into());
            if let Some(g) = ghost {
                put("ghost_batch_size", (*g).into());
            }
            if let Some(r) = renorm {
                put("renorm", true.into());
                put("rmax", r.rmax.into());
                put("dmax", r.dmax.into());
            }
        }
        Node::GroupNorm {
            groups,
            num_channels,
            eps,
            affine,
        } => {
            put("type", "GroupNorm".into());
            put("num_groups", (*groups).into());
            if let Some(v) = num_channels {
                put("num_channels", (*v).into());
            }
            put("eps", (*eps).into());
            put("affine", (*affine).into());
        }
        Node::LayerNorm {
            normalized_shape,
            eps,
            affine,
        } => {
            put("type", "LayerNorm".into());
            if let Some(v) = normalized_shape {
                put("normalized_shape", v.clone().into());
            }
            put("eps", (*eps).into());
            put("elementwise_affine", (*affine).into());
        }
        Node::Relu => put("type", "ReLU".into()),
        Node::Sigmoid => put("type", "Sigmoid".into()),
        Node::Tanh => put("type", "Tanh".into()),
        Node::Dropout { p } => {
            put("type", "Dropout".into());
            put("p", (*p).into());
        }
        Node::MaxPool2d {
            kernel_size,
            stride,
            padding,
        } => {
            put("type", "MaxPool2d".into());
            put("kernel_size", (*kernel_size).into());
            put("stride", (*stride).into());
            put("padding", (*padding).into());
        }
        Node::AvgPool2d {
            kernel_size,
            stride,
            padding,
            count_include_pad,
        } => {
            put("type", "AvgPool2d".into());
            put("kernel_size", (*kernel_size).into());
            put("stride", (*stride).into());
            put("padding", (*padding).into());
            put("count_include_pad", (*count_include_pad).into());
        }
        Node::GlobalAvgPool => put("type", "GlobalAvgPool".into()),
        Node::Flatten => put("type", "Flatten".into()),
        Node::Noise(n) => {
            put("type", "Noise".into());
            put("mean_range", n.mean_range.into());
            put("mean_jitter", n.mean_jitter.into());
            put("scale_low", n.scale_low.into());
            put("scale_high", n.scale_high.into());
            put("scale_std", n.scale_std.into());
        }
        Node::Concat { branches } => {
            put("type", "Concat".into());
            put("branches", children_json(branches));
        }
        Node::Residual {
            layers,
            shortcut,
            relu,
        } => {
            put("type", "Residual".into());
            put("layers", children_json(layers));
            if let Some(s) = shortcut {
                put("shortcut", child_json(s));
            }
            put("relu", (*relu).into());
        }
    }
    Value::Object(m)
}

fn parse_init(v: &Value, loc: Loc, source: &str) -> Result<Init> {
    let mut o = Obj::new(v, loc, source, "an init")?;
    let weight = match o.get("weight") {
        None => WeightInit::TorchDefault,
        Some(Value::String(s)) if s == "default" => WeightInit::TorchDefault,
        Some(w @ Value::Object(_)) => {
            let mut wo = Obj::new(w, o.loc.clone(), source, "a weight init")?;
            let std = wo.f64_or("normal", f64::NAN)?;
            wo.finish()?;
            if !(std.is_finite() && std > 0.0) {
                return Err(o.err("'weight' must be \"default\" or {\"normal\": STD} with STD > 0"));
            }
            WeightInit::Normal(std)
        }
        Some(_) => {
            return Err(o.err("'weight' must be \"default\" or {\"normal\": STD}"));
        }
    };
    let bias = match o.get("bias") {
        None => BiasInit::TorchDefault,
        Some(Value::String(s)) if s == "default" => BiasInit::TorchDefault,
        Some(Value::String(s)) if s == "zeros" => BiasInit::Zeros,
        Some(_) => return Err(o.err("'bias' must be \"default\" or \"zeros\"")),
    };
    o.finish()?;
    Ok(Init { weight, bias })
}

fn parse_init_spec(v: &Value, source: &str) -> Result<InitSpec> {
    let loc = Loc {
        json: "init".into(),
        module: String::new(),
    };
    let mut o = Obj::new(v, loc.clone(), source, "'init' (per layer kind)")?;
    let mut spec = InitSpec::default();
    if let Some(l) = o.get("Linear") {
        spec.linear = Some(parse_init(
            l,
            Loc {
                json: "init.Linear".into(),
                ..loc.clone()
            },
            source,
        )?);
    }
    if let Some(c) = o.get("Conv2d") {
        spec.conv = Some(parse_init(
            c,
            Loc {
                json: "init.Conv2d".into(),
                ..loc.clone()
            },
            source,
        )?);
    }
    o.finish()?;
    Ok(spec)
}

/// The module path of child `i` named `name` inside a container at `prefix`.
pub(crate) fn module_path(prefix: &str, name: &Option<String>, i: usize) -> String {
    let own = match name {
        Some(n) => n.clone(),
        None => i.to_string(),
    };
    match (prefix.is_empty(), own.is_empty()) {
        (_, true) => prefix.to_string(),
        (true, false) => own,
        (false, false) => format!("{prefix}.{own}"),
    }
}

fn parse_children(v: &Value, json: &str, module: &str, source: &str) -> Result<Vec<Child>> {
    let Value::Array(items) = v else {
        return Err(err(
            source,
            &Loc {
                json: json.to_string(),
                module: module.to_string(),
            },
            format!("expected an array of modules, found {}", json_kind(v)),
        ));
    };
    let mut out = Vec::with_capacity(items.len());
    let mut seen: Vec<String> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let child = parse_child(item, &format!("{json}[{i}]"), module, i, source)?;
        let own = child.name.clone().unwrap_or_else(|| i.to_string());
        if !own.is_empty() {
            if seen.contains(&own) {
                return Err(err(
                    source,
                    &Loc {
                        json: format!("{json}[{i}]"),
                        module: module.to_string(),
                    },
                    format!("child name '{own}' used twice in one container"),
                ));
            }
            seen.push(own);
        }
        out.push(child);
    }
    Ok(out)
}

fn parse_child(v: &Value, json: &str, prefix: &str, index: usize, source: &str) -> Result<Child> {
    let pre = Loc {
        json: json.to_string(),
        module: prefix.to_string(),
    };
    let mut o = Obj::new(v, pre.clone(), source, "a module")?;
    let name = match o.get("name") {
        None => None,
        Some(Value::String(s)) => {
            if s.contains('.') {
                return Err(o.err(format!("module name '{s}' contains a dot")));
            }
            Some(s.clone())
        }
        Some(other) => {
            return Err(o.err(format!(
                "'name' must be a string, found {}",
                json_kind(other)
            )))
        }
    };
    let module = module_path(prefix, &name, index);
    o.loc = Loc {
        json: json.to_string(),
        module: module.clone(),
    };
    let kind = match o.get("type") {
        Some(Value::String(s)) => s.clone(),
        Some(_) | None => {
            return Err(o.err(format!(
                "every module needs a 'type' (one of {})",
                LAYER_KINDS.join(", ")
            )))
        }
    };
    let kind_str: &str = &kind;
    o.kind = kind_str;
    let node = match kind_str {
        "Sequential" => {
            let layers = match o.get("layers") {
                Some(l) => parse_children(l, &format!("{json}.layers"), &module, source)?,
                None => return Err(o.err("Sequential needs 'layers'")),
            };
            if layers.is_empty() {
                return Err(o.err("Sequential has no layers"));
            }
            Node::Sequential { layers }
        }
        "Linear" => {
            let in_features = o.optional_usize("in_features")?;
            let out_features = o.positive("out_features", None)?;
            let bias = o.bool_or("bias", true)?;
            let init = match o.get("init") {
                Some(i) => Some(parse_init(i, o.loc.clone(), source)?),
                None => None,
            };
            Node::Linear {
                in_features,
                out_features,
                bias,
                init,
            }
        }
        "Conv2d" => {
            let in_channels = o.optional_usize("in_channels")?;
            let out_channels = o.positive("out_channels", None)?;
            let kernel_size = o.positive("kernel_size", None)?;
            let stride = o.positive("stride", Some(1))?;
            let padding = o.usize_or("padding", Some(0))?;
            let bias = o.bool_or("bias", true)?;
            let init = match o.get("init") {
                Some(i) => Some(parse_init(i, o.loc.clone(), source)?),
                None => None,
            };
            Node::Conv2d {
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding,
                bias,
                init,
            }
        }
        "BatchNorm1d" | "BatchNorm2d" => {
            let num_features = o.optional_usize("num_features")?;
            let eps = o.f64_or("eps", 1e-5)?;
            if eps <= 0.0 {
                return Err(o.err("'eps' must be positive"));
            }
            let momentum = match o.get("momentum") {
                None => Some(0.1),
                Some(Value::Null) => None,
                Some(Value::Number(n)) => match n.as_f64() {
                    Some(m) if m > 0.0 && m <= 1.0 => Some(m),
                    _ => return Err(o.err("'momentum' must be in (0, 1], or null (cumulative)")),
                },
                Some(_) => return Err(o.err("'momentum' must be in (0, 1], or null (cumulative)")),
            };
            let affine = o.bool_or("affine", true)?;
            let ghost = match o.optional_usize("ghost_batch_size")? {
                Some(0) => return Err(o.err("'ghost_batch_size' must be at least 1")),
                g => g,
            };
            let renorm = if o.bool_or("renorm", false)? {
                let rmax = o.f64_or("rmax", 3.0)?;
                let dmax = o.f64_or("dmax", 5.0)?;
                if rmax < 1.0 {
                    return Err(o.err(format!("'rmax' must be at least 1, found {rmax}")));
                }
                if dmax < 0.0 {
                    return Err(o.err(format!("'dmax' must be at least 0, found {dmax}")));
                }
                Some(RenormSpec { rmax, dmax })
            } else {
                None
            };
            Node::BatchNorm {
                num_features,
                two_d: kind_str == "BatchNorm2d",
                eps,
                momentum,
                affine,
                ghost,
                renorm,
            }
        }
        "GroupNorm" | "LayerNorm" => parse_group_norm(&mut o, kind_str == "LayerNorm")?,
        "ReLU" => Node::Relu,
        "Sigmoid" => Node::Sigmoid,
        "Tanh" => Node::Tanh,
        "Dropout" => {
            let p = o.f64_or("p", 0.5)?;
            if !(0.0..1.0).contains(&p) {
                return Err(o.err(format!("'p' must be in [0, 1), found {p}")));
            }
            Node::Dropout { p }
        }
        "MaxPool2d" | "AvgPool2d" => {
            let kernel_size = o.positive("kernel_size", None)?;
            let stride = o.positive("stride", Some(kernel_size))?;
            let padding = o.usize_or("padding", Some(0))?;
            if o.missing.is_none() && padding > kernel_size / 2 {
                return Err(o.err(format!(
                    "padding {padding} is above half the kernel size {kernel_size} (PyTorch's rule)"
                )));
            }
            if kind_str == "MaxPool2d" {
                Node::MaxPool2d {
                    kernel_size,
                    stride,
                    padding,
                }
            } else {
                let count_include_pad = o.bool_or("count_include_pad", true)?;
                Node::AvgPool2d {
                    kernel_size,
                    stride,
                    padding,
                    count_include_pad,
                }
            }
        }
        "GlobalAvgPool" => Node::GlobalAvgPool,
        "Flatten" => Node::Flatten,
        "Noise" => {
            let d = crate::nn::NoiseSpec::default();
            let spec = crate::nn::NoiseSpec {
                mean_range: o.f64_or("mean_range", d.mean_range)?,
                mean_jitter: o.f64_or("mean_jitter", d.mean_jitter)?,
                scale_low: o.f64_or("scale_low", d.scale_low)?,
                scale_high: o.f64_or("scale_high", d.scale_high)?,
                scale_std: o.f64_or("scale_std", d.scale_std)?,
            };
            if let Some(why) = spec.problem() {
                return Err(o.err(why));
            }
            Node::Noise(spec)
        }
        "Concat" => {
            let branches = match o.get("branches") {
                Some(b) => parse_children(b, &format!("{json}.branches"), &module, source)?,
                None => return Err(o.err("Concat needs 'branches'")),
            };
            if branches.is_empty() {
                return Err(o.err("Concat has no branches"));
            }
            Node::Concat { branches }
        }
        "Residual" => {
            // The main branch's children are named at the block's own level.
            let layers = match o.get("layers") {
                Some(l) => parse_children(l, &format!("{json}.layers"), &module, source)?,
                None => return Err(o.err("Residual needs 'layers' (its main branch)")),
            };
            if layers.is_empty() {
                return Err(o.err("Residual has an empty main branch"));
            }
            let shortcut = match o.get("shortcut") {
                None | Some(Value::Null) => None,
                Some(s) => {
                    let c = parse_child(s, &format!("{json}.shortcut"), &module, 0, source)?;
                    if c.name.is_none() {
                        return Err(o.err(
                            "the shortcut needs a 'name' (its state_dict name, e.g. \"downsample\")",
                        ));
                    }
                    if let Some(n) = layers
                        .iter()
                        .enumerate()
                        .map(|(i, l)| l.name.clone().unwrap_or_else(|| i.to_string()))
                        .find(|n| Some(n) == c.name.as_ref())
                    {
                        return Err(o.err(format!(
                            "the shortcut's name '{n}' is also a main-branch child's name"
                        )));
                    }
                    Some(Box::new(c))
                }
            };
            let relu = o.bool_or("relu", true)?;
            Node::Residual {
                layers,
                shortcut,
                relu,
            }
        }
        other => {
            return Err(o.err(format!(
                "unknown layer type '{other}' (known: {})",
                LAYER_KINDS.join(", ")
            )))
        }
    };
    o.finish()?;
    Ok(Child { name, node })
}

/// The keys of `GroupNorm` (`num_groups`, `num_channels`, `eps`, `affine`) or `LayerNorm`
/// (`normalized_shape`: an integer or an array of integers, `eps`, `elementwise_affine`).
fn parse_group_norm(o: &mut Obj<'_>, layer: bool) -> Result<Node> {
    let eps = o.f64_or("eps", 1e-5)?;
    if eps <= 0.0 {
        return Err(o.err("'eps' must be positive"));
    }
    if !layer {
        let groups = o.positive("num_groups", None)?;
        let num_channels = o.optional_usize("num_channels")?;
        let affine = o.bool_or("affine", true)?;
        return Ok(Node::GroupNorm {
            groups,
            num_channels,
            eps,
            affine,
        });
    }
    let given = o.get("normalized_shape");
    let bad = || o.err("'normalized_shape' must be a positive integer or an array of them");
    let normalized_shape = match given {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![
            n.as_u64().filter(|&v| v >= 1).ok_or_else(bad)? as usize
        ]),
        Some(Value::Array(dims)) if !dims.is_empty() => Some(
            dims.iter()
                .map(|d| {
                    d.as_u64()
                        .filter(|&v| v >= 1)
                        .map(|v| v as usize)
                        .ok_or_else(bad)
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        Some(_) => return Err(bad()),
    };
    let affine = o.bool_or("elementwise_affine", true)?;
    Ok(Node::LayerNorm {
        normalized_shape,
        eps,
        affine,
    })
}
