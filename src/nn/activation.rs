//! Sigmoid, ReLU and Tanh layers: elementwise, their backward passes use the saved output only.

use super::{check_forward, Ctx, Layer};
use crate::kernels::activation as k;
use crate::kernels::{par_ranges, Disjoint};
use crate::Result;

/// An elementwise nonlinearity, by its forward and backward kernels.
pub trait Nonlinearity: Send + 'static {
    /// The layer's description, as PyTorch prints the module (`ReLU()`).
    const NAME: &'static str;
    /// `y = f(x)`, elementwise (equal lengths).
    fn forward(x: &[f32], y: &mut [f32]);
    /// dx from the saved output y and the output gradient dy.
    fn backward(y: &[f32], dy: &[f32], dx: &mut [f32]);
    /// The same function as a BatchNorm applies it fused (`None`: it cannot).
    const FUSED: Option<crate::kernels::batch_norm::Act> = None;
    /// Below this many values a layer's work stays on one thread.
    const PARALLEL_MIN_LEN: usize = PARALLEL_MIN_LEN;
}

/// The logistic sigmoid, `1 / (1 + exp(-x))`; derivative `y (1 - y)`.
pub struct SigmoidFn;
impl Nonlinearity for SigmoidFn {
    // An exponential per value: worth splitting from the MLP's 60 x 100 up.
    const PARALLEL_MIN_LEN: usize = 4096;
    const NAME: &'static str = "Sigmoid()";
    const FUSED: Option<crate::kernels::batch_norm::Act> =
        Some(crate::kernels::batch_norm::Act::Sigmoid);
    fn forward(x: &[f32], y: &mut [f32]) {
        k::sigmoid_forward(x, y)
    }
    fn backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
        k::sigmoid_backward(y, dy, dx)
    }
}

/// `max(x, 0)`; derivative 1 where the output is positive, else 0 (0 at exactly 0, as PyTorch).
pub struct ReluFn;
impl Nonlinearity for ReluFn {
    const NAME: &'static str = "ReLU()";
    const FUSED: Option<crate::kernels::batch_norm::Act> =
        Some(crate::kernels::batch_norm::Act::Relu);
    fn forward(x: &[f32], y: &mut [f32]) {
        k::relu_forward(x, y)
    }
    fn backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
        k::relu_backward(y, dy, dx)
    }
}

/// tanh, whose derivative is `1 - y^2` of the saved output.
pub struct TanhFn;
impl Nonlinearity for TanhFn {
    // An exponential per value: worth splitting from the MLP's 60 x 100 up.
    const PARALLEL_MIN_LEN: usize = 4096;
    const NAME: &'static str = "Tanh()";
    fn forward(x: &[f32], y: &mut [f32]) {
        k::tanh_forward(x, y)
    }
    fn backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
        k::tanh_backward(y, dy, dx)
    }
}

/// Below this many values a layer's work stays on one thread (the MLP's layers are far
/// smaller; the convolutional maps far larger), unless the nonlinearity says otherwise.
const PARALLEL_MIN_LEN: usize = 1 << 15;

/// The layer for a nonlinearity on `size` features per example. Stateless: works without
/// `reserve`, and `backward` differentiates at the output `y` it is given.
pub struct Elementwise<F: Nonlinearity> {
    size: usize,
    _f: std::marker::PhantomData<F>,
}

/// The sigmoid on `size` features per example (PyTorch's `nn.Sigmoid`).
pub type Sigmoid = Elementwise<SigmoidFn>;
/// ReLU on `size` features per example (PyTorch's `nn.ReLU`).
pub type Relu = Elementwise<ReluFn>;
/// tanh on `size` features per example (PyTorch's `nn.Tanh`).
pub type Tanh = Elementwise<TanhFn>;

impl<F: Nonlinearity> Elementwise<F> {
    /// The nonlinearity on `size` values per example.
    pub fn new(size: usize) -> Self {
        Elementwise {
            size,
            _f: std::marker::PhantomData,
        }
    }
}

impl<F: Nonlinearity> Layer for Elementwise<F> {
    fn as_activation(&self) -> Option<crate::kernels::batch_norm::Act> {
        F::FUSED
    }
    fn in_size(&self) -> usize {
        self.size
    }
    fn out_size(&self) -> usize {
        self.size
    }
    fn reserve(&mut self, _max_batch: usize) {}
    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        check_forward(self, x, y, n)?;
        let len = n * self.size;
        let threads = if len >= F::PARALLEL_MIN_LEN {
            ctx.threads
        } else {
            1
        };
        let ys = Disjoint::new(&mut y[..len]);
        par_ranges(threads, len, F::PARALLEL_MIN_LEN / 2, |r| {
            // SAFETY: the ranges are disjoint.
            F::forward(&x[r.clone()], unsafe { ys.range(r) })
        });
        Ok(())
    }
    fn backward(
        &mut self,
        ctx: Ctx,
        _x: &[f32],
        y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        if let Some(dx) = dx {
            let len = n * self.size;
            let threads = if len >= F::PARALLEL_MIN_LEN {
                ctx.threads
            } else {
                1
            };
            let dxs = Disjoint::new(&mut dx[..len]);
            par_ranges(threads, len, F::PARALLEL_MIN_LEN / 2, |r| {
                // SAFETY: the ranges are disjoint.
                F::backward(&y[r.clone()], &dy[r.clone()], unsafe { dxs.range(r) })
            });
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        F::NAME.into()
    }
}
