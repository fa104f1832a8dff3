//! Layers: each owns its parameters, their gradients, its buffers (BN running statistics) and the
//! cache its backward pass needs, sized once by `reserve` for the largest batch and reused.
//!
//! Conventions shared by every layer:
//! - activations are row-major `n x features` slices (`features = C*H*W` for feature maps);
//! - `backward` *writes* (does not accumulate) parameter gradients: no parameter is used twice
//!   in one step, so no zeroing pass is needed;
//! - `visit_state` walks named tensors with PyTorch's `state_dict` names.

pub mod activation;
pub mod batch_norm;
pub mod concat;
pub mod conv;
pub mod dropout;
pub mod flatten;
pub mod linear;
pub mod named;
pub mod pool;
pub mod residual;
pub mod sequential;

pub use activation::{Relu, Sigmoid, Tanh};
pub use batch_norm::{BatchNorm, InferenceStats};
pub use concat::Concat;
pub use conv::Conv2d;
pub use dropout::Dropout;
pub use flatten::Flatten;
pub use linear::Linear;
pub use named::NamedSequential;
pub use pool::{AvgPool2d, GlobalAvgPool, MaxPool2d};
pub use residual::Residual;
pub use sequential::Sequential;

use crate::Result;

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
    pub mode: Mode,
    /// Most threads a kernel may use.
    pub threads: usize,
}

/// A named tensor handed out by `visit_state`.
pub enum TensorMut<'a> {
    F32(&'a mut [f32]),
    /// A 2-D tensor of the given shape `[rows, cols]` stored transposed (`cols x rows`), as
    /// `Linear` keeps its weight; checkpoints transpose on the way in and out.
    F32T(&'a mut [f32]),
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

/// The two batch halves the convolutional layers split their work into, examples `[0, n/2)`
/// and `[n/2, n)` of a buffer holding `size` values per example: the same split whatever the
/// thread count, so results do not depend on it.
pub(crate) fn halves<T>(v: &[T], n: usize, size: usize) -> (&[T], &[T]) {
    v[..n * size].split_at(n / 2 * size)
}

/// `halves` of a buffer the layer writes.
pub(crate) fn halves_mut<T>(v: &mut [T], n: usize, size: usize) -> (&mut [T], &mut [T]) {
    v[..n * size].split_at_mut(n / 2 * size)
}

pub trait Layer: Send {
    /// Features per example in and out.
    fn in_size(&self) -> usize;
    fn out_size(&self) -> usize;
    /// Size caches for batches of up to `max_batch` examples. Called once, outside the hot loop.
    fn reserve(&mut self, max_batch: usize);
    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()>;
    /// `x` and `y` are the input and output of the last forward; `dx` is `None` when no
    /// gradient is needed below (the first layer).
    fn backward(
        &mut self,
        ctx: Ctx,
        x: &[f32],
        y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    );
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
    /// The layers inside a container, in forward order (a residual block: the main branch,
    /// then the shortcut); empty for a leaf. Lets fold and export walk any tree.
    fn children(&mut self) -> Vec<&mut dyn Layer> {
        Vec::new()
    }
    /// The concrete layer, for code that needs more than the trait (folding, export) to
    /// downcast to `Linear`, `BatchNorm`, ...
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}
