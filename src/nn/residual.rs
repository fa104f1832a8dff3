//! A residual block, `y = act(main(x) + shortcut(x))`: the basic block of ResNet as PyTorch
//! (torchvision, ../shared/peers/torch_resnet.py) writes it,
//!
//! ```text
//! out = F.relu(self.bn1(self.conv1(x)))
//! out = self.bn2(self.conv2(out))
//! short = x if self.downsample is None else self.downsample(x)
//! return F.relu(out + short)
//! ```
//!
//! - `main` is a `Sequential` whose children are named at the block's own level: its tensors are
//!   `prefix + conv1.weight`, `prefix + bn1.weight`, ... (the ReLU between, a call in
//!   `forward`, is an unnamed child);
//! - the shortcut is the identity or a projection layer with its own child name (`downsample`,
//!   giving `prefix + downsample.0.weight`);
//! - `act` is an optional ReLU after the sum (derivative 0 at exactly 0, PyTorch's convention).
//!
//! Order of parameters, `state_dict` tensors, BN layers and generators: main's, then the
//! shortcut's (PyTorch's registration order conv1, bn1, conv2, bn2, downsample).
//!
//! Backward: with `g` the gradient at the sum (`dy` masked where the ReLU's output is 0),
//! `dx = main's dx(g) + shortcut's dx(g)`, the shortcut's being `g` itself for the identity.
//!
//! The block owns main's output (its last layer's backward may need it), the projection's
//! output and input gradient, and the masked gradient, all sized by `reserve`. The elementwise
//! steps split the batch in halves like the other conv-path layers; each value is computed the
//! same way on one or two threads.

use super::named::{check_names, child_prefix};
use super::{
    backward_nothing, check_forward, par_batch, span, BatchNorm, Ctx, Layer, Sequential, TensorMut,
};
use crate::kernels::activation as k;
use crate::kernels::Disjoint;
use crate::{Error, Result};

/// Below this many values the elementwise steps stay on one thread.
const PARALLEL_MIN_LEN: usize = 1 << 15;

/// `y = act(main(x) + shortcut(x))`, ResNet's basic block (see the module doc).
///
/// Works without `reserve`. `backward` before any forward pass, or with another batch size
/// than the last forward's, sets every parameter gradient inside to zero and `dx` to zeros.
pub struct Residual {
    main: Sequential,
    /// The projection and its child name; `None` for the identity.
    shortcut: Option<(String, Box<dyn Layer>)>,
    relu: bool,
    /// Main's output from the last forward pass, `n x out`.
    main_out: Vec<f32>,
    /// The projection's output from the last forward pass (empty for the identity).
    short_out: Vec<f32>,
    /// The gradient at the sum, `dy` masked by the ReLU (empty without ReLU: it is `dy`).
    grad_sum: Vec<f32>,
    /// The projection's input gradient, added to main's (empty for the identity).
    dx_short: Vec<f32>,
    max_batch: usize,
    /// The batch size of the last successful forward pass (0: none).
    last_n: usize,
}

impl Residual {
    /// `y = relu?(main(x) + shortcut(x))`, the shortcut a named projection layer or, for
    /// `None`, the identity.
    ///
    /// An error if main has no layers or its children's sizes do not chain, the shortcut's name
    /// contains a dot or repeats one of main's children, the projection's input or output size
    /// differs from main's, or (identity) main does not keep the size of its input.
    pub fn new(
        main: Sequential,
        shortcut: Option<(String, Box<dyn Layer>)>,
        relu: bool,
    ) -> Result<Residual> {
        if main.layers.is_empty() {
            return Err(Error::Shape("Residual: the main path has no layers".into()));
        }
        main.check_chain()
            .map_err(|e| Error::Shape(format!("Residual main path: {}", shape_msg(e))))?;
        let (i, o) = (main.in_size(), main.out_size());
        match &shortcut {
            Some((name, layer)) => {
                let mut names = main.child_names();
                names.push(name.clone());
                check_names(&names)?;
                if layer.in_size() != i {
                    return Err(Error::Shape(format!(
                        "Residual: shortcut '{name}' takes {} inputs, the main path takes {i}",
                        layer.in_size()
                    )));
                }
                if layer.out_size() != o {
                    return Err(Error::Shape(format!(
                        "Residual: shortcut '{name}' gives {} outputs, the main path gives {o}",
                        layer.out_size()
                    )));
                }
            }
            None => {
                if i != o {
                    return Err(Error::Shape(format!(
                        "Residual: an identity shortcut needs a main path that keeps the size \
                         of its input, but it takes {i} inputs and gives {o} (use a projection \
                         shortcut)"
                    )));
                }
            }
        }
        Ok(Residual {
            main,
            shortcut,
            relu,
            main_out: Vec::new(),
            short_out: Vec::new(),
            grad_sum: Vec::new(),
            dx_short: Vec::new(),
            max_batch: 0,
            last_n: 0,
        })
    }

    /// The main path.
    pub fn main(&mut self) -> &mut Sequential {
        &mut self.main
    }

    /// The projection shortcut and its child name; `None` for the identity.
    pub fn shortcut(&mut self) -> Option<(&str, &mut dyn Layer)> {
        match &mut self.shortcut {
            Some((name, layer)) => Some((name.as_str(), layer.as_mut())),
            None => None,
        }
    }

    /// Whether a ReLU follows the sum.
    pub fn has_relu(&self) -> bool {
        self.relu
    }

    /// Main's output (before the sum) from the last forward pass, `n x out_size`.
    pub fn main_output(&self) -> &[f32] {
        &self.main_out
    }
}

/// The message of a shape error, without its prefix.
fn shape_msg(e: Error) -> String {
    match e {
        Error::Shape(m) => m,
        other => other.to_string(),
    }
}

crate::simd_kernel! {
    /// `y = max(a + b, 0)` (0 for NaN, as `kernels::activation::relu_forward`).
    fn add_relu(a: &[f32], b: &[f32], y: &mut [f32]) {
        for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
            let s = u + v;
            *o = if s > 0.0 { s } else { 0.0 };
        }
    }
}

crate::simd_kernel! {
    /// `y = a + b`.
    fn add(a: &[f32], b: &[f32], y: &mut [f32]) {
        for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
            *o = u + v;
        }
    }
}

crate::simd_kernel! {
    /// `y += a`.
    pub(crate) fn add_assign(y: &mut [f32], a: &[f32]) {
        for (o, &v) in y.iter_mut().zip(a) {
            *o += v;
        }
    }
}

impl Layer for Residual {
    fn in_size(&self) -> usize {
        self.main.in_size()
    }
    fn out_size(&self) -> usize {
        self.main.out_size()
    }

    fn reserve(&mut self, max_batch: usize) {
        let max_batch = max_batch.max(self.max_batch);
        self.max_batch = max_batch;
        let (i, o) = (self.in_size(), self.out_size());
        self.main.reserve(max_batch);
        // Grown, never shrunk: the last forward pass's outputs stay for `backward`.
        let grow = |v: &mut Vec<f32>, len: usize| {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        };
        grow(&mut self.main_out, max_batch * o);
        if self.relu {
            grow(&mut self.grad_sum, max_batch * o);
        }
        if let Some((_, layer)) = &mut self.shortcut {
            layer.reserve(max_batch);
            grow(&mut self.short_out, max_batch * o);
            grow(&mut self.dx_short, max_batch * i);
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        check_forward(self, x, y, n)?;
        let (i, o) = (self.in_size(), self.out_size());
        let sized = n <= self.max_batch
            && self.main_out.len() >= self.max_batch * o
            && (!self.relu || self.grad_sum.len() >= self.max_batch * o)
            && (self.shortcut.is_none()
                || (self.short_out.len() >= self.max_batch * o
                    && self.dx_short.len() >= self.max_batch * i));
        if !sized {
            self.reserve(n);
        }
        let len = n * o;
        self.main.forward(ctx, x, &mut self.main_out[..len], n)?;
        let other: &[f32] = match &mut self.shortcut {
            Some((_, layer)) => {
                layer.forward(ctx, x, &mut self.short_out[..len], n)?;
                &self.short_out[..len]
            }
            // Identity: in and out sizes agree (checked in `new`).
            None => &x[..len],
        };
        let threads = if len >= PARALLEL_MIN_LEN {
            ctx.threads
        } else {
            1
        };
        let (main, relu) = (&self.main_out, self.relu);
        let ys = Disjoint::new(&mut y[..len]);
        par_batch(threads, n, |r| {
            let r = span(&r, o);
            // SAFETY: the example ranges are disjoint.
            let yr = unsafe { ys.range(r.clone()) };
            if relu {
                add_relu(&main[r.clone()], &other[r], yr);
            } else {
                add(&main[r.clone()], &other[r], yr);
            }
        });
        self.last_n = n;
        Ok(())
    }

    fn backward(
        &mut self,
        ctx: Ctx,
        x: &[f32],
        y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        if n != self.last_n {
            return backward_nothing(self, dx, n);
        }
        let (i, o) = (self.in_size(), self.out_size());
        let len = n * o;
        let threads = if len.max(n * i) >= PARALLEL_MIN_LEN {
            ctx.threads
        } else {
            1
        };
        let g: &[f32] = if self.relu {
            let gs = Disjoint::new(&mut self.grad_sum[..len]);
            par_batch(threads, n, |r| {
                let r = span(&r, o);
                // SAFETY: the example ranges are disjoint.
                k::relu_backward(&y[r.clone()], &dy[r.clone()], unsafe { gs.range(r) });
            });
            &self.grad_sum[..len]
        } else {
            &dy[..len]
        };
        let mut dx = dx;
        self.main
            .backward(ctx, x, &self.main_out[..len], g, dx.as_deref_mut(), n);
        // The shortcut's input gradient, added to main's.
        let short_dx: Option<&[f32]> = match &mut self.shortcut {
            Some((_, layer)) => {
                let out = &self.short_out[..len];
                if dx.is_some() {
                    let buf = &mut self.dx_short[..n * i];
                    layer.backward(ctx, x, out, g, Some(buf), n);
                    Some(&self.dx_short[..n * i])
                } else {
                    // Its parameter gradients are still needed.
                    layer.backward(ctx, x, out, g, None, n);
                    None
                }
            }
            None => Some(g),
        };
        if let (Some(d), Some(s)) = (dx, short_dx) {
            let ds = Disjoint::new(&mut d[..n * i]);
            par_batch(threads, n, |r| {
                let r = span(&r, i);
                // SAFETY: the example ranges are disjoint.
                add_assign(unsafe { ds.range(r.clone()) }, &s[r]);
            });
        }
    }

    fn zero_grad(&mut self) {
        self.main.zero_grad();
        if let Some((_, layer)) = &mut self.shortcut {
            layer.zero_grad();
        }
    }

    fn for_each_param(&mut self, f: &mut dyn FnMut(&mut [f32], &[f32])) {
        self.main.for_each_param(f);
        if let Some((_, layer)) = &mut self.shortcut {
            layer.for_each_param(f);
        }
    }

    fn visit_state(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        // Main's children sit at the block's own level.
        self.main.visit_state(prefix, f);
        if let Some((name, layer)) = &mut self.shortcut {
            layer.visit_state(&child_prefix(prefix, name), f);
        }
    }

    fn for_each_rng(&mut self, f: &mut dyn FnMut(&mut rand_chacha::ChaCha8Rng)) {
        self.main.for_each_rng(f);
        if let Some((_, layer)) = &mut self.shortcut {
            layer.for_each_rng(f);
        }
    }

    fn for_each_batch_norm(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        self.main.for_each_batch_norm(f);
        if let Some((_, layer)) = &mut self.shortcut {
            layer.for_each_batch_norm(f);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn children(&mut self) -> Vec<&mut dyn Layer> {
        let mut out: Vec<&mut dyn Layer> = vec![&mut self.main];
        if let Some((_, s)) = &mut self.shortcut {
            out.push(s.as_mut());
        }
        out
    }

    /// Main's children, then the shortcut, then the sum, e.g.
    ///
    /// ```text
    /// Residual(
    ///   (conv1): Conv2d(16, 32, kernel_size=(3, 3), stride=(2, 2), ...) on 32x32
    ///   ...
    ///   (downsample): Sequential(
    ///     (0): Conv2d(16, 32, kernel_size=(1, 1), stride=(2, 2), bias=False) on 32x32
    ///     (1): BatchNorm2d(32, ...)
    ///   )
    ///   sum: ReLU(main(x) + downsample(x))
    /// )
    /// ```
    fn describe(&self) -> String {
        let mut lines = self.main.describe_children();
        let short = match &self.shortcut {
            Some((name, layer)) => {
                let shown = if name.is_empty() { "-" } else { name };
                lines.push(format!(
                    "  ({shown}): {}",
                    layer.describe().replace('\n', "\n  ")
                ));
                format!("{shown}(x)")
            }
            None => "x".to_string(),
        };
        let sum = format!("main(x) + {short}");
        lines.push(if self.relu {
            format!("  sum: ReLU({sum})")
        } else {
            format!("  sum: {sum}")
        });
        format!("Residual(\n{}\n)", lines.join("\n"))
    }
}
