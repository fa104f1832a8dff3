//! Layers: each owns its parameters, their gradients, its buffers (BN running statistics) and the
//! cache its backward pass needs, sized for the largest batch seen and reused.
//!
//! Conventions shared by every layer:
//! - activations are row-major `n x features` slices of `f32` (`features = C*H*W` for feature
//!   maps, NCHW);
//! - buffers are sized by `reserve` up front, or on demand by the first `forward` (or
//!   `backward`) with a batch larger than any before: a layer works without `reserve`, and
//!   allocates nothing once sized for its largest batch (the training loop calls `reserve`
//!   outside the timed steps);
//! - `backward` differentiates the last `forward` and *writes* (does not accumulate) parameter
//!   gradients: no parameter is used twice in one step, so no zeroing pass is needed;
//! - `visit_state` walks named tensors with PyTorch's `state_dict` names.
//!
//! A layer used on its own, as a library user would:
//!
//! ```
//! use bnlab::nn::{BatchNorm, Ctx, Layer, Mode};
//!
//! let (n, c) = (4, 3);
//! let mut bn = BatchNorm::new(c, 1, 1e-5, true); // BatchNorm1d(3)
//! let x: Vec<f32> = (0..n * c).map(|i| i as f32).collect();
//! let mut y = vec![0.0; n * c];
//! let train = Ctx { mode: Mode::Train, threads: 1 };
//! bn.forward(train, &x, &mut y, n)?;
//! let dy = vec![1.0; n * c];
//! let mut dx = vec![0.0; n * c];
//! bn.backward(train, &x, &y, &dy, Some(&mut dx), n);
//! assert_eq!(bn.grad_beta().unwrap(), &[4.0, 4.0, 4.0]); // the sum of dy per feature
//! bn.forward(Ctx { mode: Mode::Eval, threads: 1 }, &x, &mut y, n)?;
//! # Ok::<(), bnlab::Error>(())
//! ```

pub mod activation;
pub mod batch_norm;
pub mod concat;
pub mod conv;
pub mod dropout;
pub mod flatten;
pub mod group_norm;
pub mod linear;
pub mod named;
pub mod noise;
pub mod pool;
pub mod residual;
pub mod sequential;
pub(crate) mod winograd;

pub use activation::{Relu, Sigmoid, Tanh};
pub use batch_norm::{BatchNorm, InferenceStats, Renorm, RenormSchedule};
pub use concat::Concat;
pub use conv::{Conv2d, ConvAlgo};
pub use dropout::Dropout;
pub use flatten::Flatten;
pub use group_norm::GroupNorm;
pub use linear::Linear;
pub use named::NamedSequential;
pub use noise::{Noise, NoiseSpec};
pub use pool::{AvgPool2d, GlobalAvgPool, MaxPool2d};
pub use residual::Residual;
pub use sequential::Sequential;

use crate::kernels::batch_norm::Act;
use crate::{Error, Result};

/// What a forward pass is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Training: BN normalizes with mini-batch statistics and updates its running averages;
    /// dropout drops.
    Train,
    /// Inference: BN normalizes with its inference statistics (running or population);
    /// dropout is the identity.
    Eval,
    /// The paper's Algorithm 2 pass: the network is frozen, BN normalizes with mini-batch
    /// statistics (as the layer above saw them in training) and accumulates them; dropout off.
    Population,
}

/// Per-call settings passed down the network.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    /// Training, inference or Algorithm 2's accumulation pass.
    pub mode: Mode,
    /// Most threads a kernel may use.
    pub threads: usize,
}

/// A named tensor handed out by `visit_state`.
pub enum TensorMut<'a> {
    /// Float values in the tensor's own row-major layout.
    F32(&'a mut [f32]),
    /// A 2-D tensor of the given shape `[rows, cols]` stored transposed (`cols x rows`), as
    /// `Linear` keeps its weight; checkpoints transpose on the way in and out.
    F32T(&'a mut [f32]),
    /// A scalar integer (BN's `num_batches_tracked`).
    I64(&'a mut i64),
}

impl TensorMut<'_> {
    /// The float values in storage order, if this is a float tensor.
    pub fn floats(&mut self) -> Option<&mut [f32]> {
        match self {
            TensorMut::F32(v) | TensorMut::F32T(v) => Some(v),
            TensorMut::I64(_) => None,
        }
    }
}

/// The values of the examples `r` in a buffer holding `size` values per example.
pub(crate) fn span(r: &std::ops::Range<usize>, size: usize) -> std::ops::Range<usize> {
    r.start * size..r.end * size
}

/// `f(examples)` for contiguous ranges of the batch `0..n`, one per thread (up to
/// `threads`): for layers whose outputs for an example depend on that example alone, so that
/// any split gives the same results.
pub(crate) fn par_batch<F: Fn(std::ops::Range<usize>) + Sync>(threads: usize, n: usize, f: F) {
    crate::kernels::par_ranges(threads, n, 1, f);
}

/// `Error::Shape` unless `x` holds `n` examples of `layer.in_size()` values and `y` has room for
/// `n` of `layer.out_size()`: the check every `forward` makes before touching its slices.
pub(crate) fn check_forward<L: Layer>(layer: &L, x: &[f32], y: &[f32], n: usize) -> Result<()> {
    let (i, o) = (layer.in_size(), layer.out_size());
    let short = |what: &str, have: usize, size: usize| {
        let first = layer.describe();
        let first = first.lines().next().unwrap_or_default();
        Error::Shape(format!(
            "{first}: {what} holds {have} values, a batch of {n} needs {n} x {size}"
        ))
    };
    if n.checked_mul(i).is_none_or(|need| x.len() < need) {
        return Err(short("the input", x.len(), i));
    }
    if n.checked_mul(o).is_none_or(|need| y.len() < need) {
        return Err(short("the output", y.len(), o));
    }
    Ok(())
}

/// What `backward` does when it has no forward pass to differentiate (see
/// [`Layer::backward`]): parameter gradients set to zero, and `dx`, if asked for, filled with
/// zeros.
pub(crate) fn backward_nothing<L: Layer + ?Sized>(layer: &mut L, dx: Option<&mut [f32]>, n: usize) {
    layer.zero_grad();
    if let Some(dx) = dx {
        let len = n * layer.in_size();
        dx[..len].fill(0.0);
    }
}

/// A layer of a network: forward and backward passes on batches of examples, with its
/// parameters, gradients and buffers inside.
///
/// Every method may be called in any order. Buffers are sized by [`Layer::reserve`] or on demand
/// (see the module doc); [`Layer::backward`] before any forward pass does not panic (it has
/// nothing to differentiate, see there).
pub trait Layer: Send {
    /// Features (values) per example at the input.
    fn in_size(&self) -> usize;
    /// Features (values) per example at the output.
    fn out_size(&self) -> usize;
    /// Size the caches for batches of up to `max_batch` examples, so that later passes allocate
    /// nothing. Optional: `forward` sizes them on demand when a batch exceeds what was reserved.
    /// Never shrinks them, and keeps what the last forward pass cached.
    fn reserve(&mut self, max_batch: usize);
    /// `y = layer(x)` for a batch of `n` examples: `x` holds `n x in_size` values and `y` gets
    /// `n x out_size` (both row-major; longer slices are fine, the rest is untouched). In
    /// `Mode::Train` BatchNorm also updates its running statistics and dropout draws a mask.
    ///
    /// Errors: `Error::Shape` if `x` or `y` is too short for `n` examples; BatchNorm in
    /// `Mode::Train` or `Mode::Population` gives `Error::BatchTooSmall` when a channel has fewer
    /// than 2 values (a batch of one in the fully connected layout). After an error the layer
    /// has no forward pass for `backward` to differentiate.
    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()>;
    /// The gradients of the last `forward`: `x` and `y` are its input and output, `n` its batch
    /// size, `dy` the gradient at the output (`n x out_size`). Writes (overwrites) the parameter
    /// gradients, read through [`Layer::for_each_param`] or the layers' `grad_*` accessors, and
    /// the input gradient into `dx` (`n x in_size`); `dx` is `None` when no gradient is needed
    /// below (the first layer).
    ///
    /// Without a forward pass to differentiate (before any forward pass, after one that
    /// failed, or with an `n` other than the last forward's), the layers that cache something
    /// in `forward` (BatchNorm, GroupNorm, Dropout, MaxPool2d, and the containers Sequential, Concat and
    /// Residual) set their parameter gradients to zero and fill `dx` with zeros. The others
    /// (activations, Linear, Conv2d, AvgPool2d, GlobalAvgPool, Flatten) differentiate at the
    /// `x` and `y` given, whatever was forwarded before.
    ///
    /// Panics if a slice is shorter than `n` examples.
    fn backward(
        &mut self,
        ctx: Ctx,
        x: &[f32],
        y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    );
    /// Set every parameter gradient to zero (PyTorch's `zero_grad`); a no-op for layers without
    /// parameters.
    fn zero_grad(&mut self) {}
    /// Each trainable parameter with its gradient, in `state_dict` order.
    fn for_each_param(&mut self, f: &mut dyn FnMut(&mut [f32], &[f32])) {
        let _ = f;
    }
    /// Each tensor of the `state_dict` (parameters and buffers) with its name and shape.
    fn visit_state(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        let _ = (prefix, f);
    }
    /// Each random generator inside (dropout masks), in a fixed order, for run checkpoints.
    fn for_each_rng(&mut self, f: &mut dyn FnMut(&mut rand_chacha::ChaCha8Rng)) {
        let _ = f;
    }
    /// Each batch-normalization layer inside, for settings and Algorithm 2.
    fn for_each_batch_norm(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        let _ = f;
    }
    /// A short description for summaries, e.g. `Linear(784, 100)`.
    fn describe(&self) -> String;
    /// The activation this layer applies to its own output in the same pass (a BatchNorm
    /// fused with the ReLU or sigmoid after it, see `Sequential::fuse`); `Identity` for none.
    fn fused_activation(&self) -> Act {
        Act::Identity
    }
    /// Apply `act` to this layer's output in the same pass (`Identity`: stop), taking the
    /// activation's output and gradient in `backward`. False (and nothing changes) for the
    /// layers that cannot: all but BatchNorm.
    fn fuse_activation(&mut self, act: Act) -> bool {
        act == Act::Identity
    }
    /// The activation this layer is, when another layer can apply it in its own pass (ReLU,
    /// sigmoid); `None` for other layers.
    fn as_activation(&self) -> Option<Act> {
        None
    }
    /// The layers inside a container, in forward order (a residual block: the main branch,
    /// then the shortcut); empty for a leaf. Lets fold and export walk any tree.
    fn children(&mut self) -> Vec<&mut dyn Layer> {
        Vec::new()
    }
    /// The concrete layer, for code that needs more than the trait (folding, export) to
    /// downcast to `Linear`, `BatchNorm`, ...
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}
