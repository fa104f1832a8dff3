//! A chain of layers, named "0", "1", ... as in PyTorch's `nn.Sequential`, or with explicit
//! names (`Sequential::named`, see `named.rs`) for a module whose children are attributes. It
//! owns the intermediate activations and their gradients, sized by `reserve` or by the first
//! forward pass of a larger batch.

use super::named::child_prefix;
use super::{backward_nothing, check_forward, BatchNorm, Ctx, Layer, TensorMut};
use crate::kernels::batch_norm::Act;
use crate::Result;

/// Layers applied one after the other, PyTorch's `nn.Sequential` (see the module doc).
///
/// Works without `reserve`. `backward` before any forward pass, or with another batch size
/// than the last forward's, sets every child's parameter gradients to zero and `dx` to zeros.
pub struct Sequential {
    /// The children in forward order. Each must take as many inputs as the one before gives
    /// (see `check_chain`; a mismatch makes `forward` return `Error::Shape`).
    pub layers: Vec<Box<dyn Layer>>,
    /// Each child's `state_dict` name; `None` for PyTorch's indices "0", "1", ...
    pub(super) names: Option<Vec<String>>,
    /// acts[i] is the output of layers[i], for every layer but the last (which writes to the
    /// caller's buffer).
    acts: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    max_batch: usize,
    /// The batch size of the last successful forward pass (0: none).
    last_n: usize,
}

/// Fuse every BatchNorm followed by a ReLU or sigmoid in `layer` and the containers inside it
/// (`on`), or undo every fusion (`!on`). See [`Sequential::fuse`].
pub fn fuse_activations(layer: &mut dyn Layer, on: bool) {
    if let Some(seq) = layer.as_any_mut().downcast_mut::<Sequential>() {
        seq.fuse(on);
        return;
    }
    for child in layer.children() {
        fuse_activations(child, on);
    }
}

impl Sequential {
    /// A chain named by indices as `nn.Sequential`. Sizes are not checked here (see
    /// `check_chain`; `Sequential::named` checks them).
    pub fn new(layers: Vec<Box<dyn Layer>>) -> Self {
        Sequential {
            layers,
            names: None,
            acts: Vec::new(),
            grads: Vec::new(),
            max_batch: 0,
            last_n: 0,
        }
    }

    /// Fuse (`on`) each BatchNorm followed by a ReLU or sigmoid into one pass (the BN + ReLU
    /// and BN + sigmoid fusion): the BN layer applies the activation as it normalizes and
    /// takes the activation's derivative in its backward pass, and the activation layer is
    /// skipped. The network computes the same bits either way; the fused one moves fewer
    /// bytes. Applies to the containers inside too. `!on` undoes it everywhere.
    ///
    /// The output of a fused BN layer (the activation's input) is not kept: see
    /// [`Sequential::keep_output`].
    pub fn fuse(&mut self, on: bool) {
        for i in 0..self.layers.len() {
            let act = match self.layers.get(i + 1) {
                Some(next) if on => next.as_activation().unwrap_or(Act::Identity),
                _ => Act::Identity,
            };
            self.layers[i].fuse_activation(act);
        }
        for layer in &mut self.layers {
            fuse_activations(layer.as_mut(), on);
        }
        // A forward pass made before now was made with the other arrangement.
        self.last_n = 0;
    }

    /// Keep the output of layer `i` (undo its fusion with the activation after it, if any),
    /// for code that reads it with [`Sequential::output_of`] (probes).
    pub fn keep_output(&mut self, i: usize) {
        if self.is_fused(i) {
            self.layers[i].fuse_activation(Act::Identity);
            self.last_n = 0;
        }
    }

    /// Layer `i` applies layer `i + 1` itself (kept true by `check_fusion`).
    fn is_fused(&self, i: usize) -> bool {
        i + 1 < self.layers.len() && self.layers[i].fused_activation() != Act::Identity
    }

    /// Undo the fusion of a layer whose next layer is not the activation it applies (the
    /// layers were replaced or rearranged since `fuse`), so that every layer runs.
    fn check_fusion(&mut self) {
        for i in 0..self.layers.len() {
            let act = self.layers[i].fused_activation();
            if act != Act::Identity
                && self.layers.get(i + 1).and_then(|l| l.as_activation()) != Some(act)
            {
                self.layers[i].fuse_activation(Act::Identity);
            }
        }
    }

    /// The largest batch the buffers are sized for (by `reserve` or a forward pass).
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The output of layer `i` from the last forward pass (`i` below the last layer), as
    /// `n x out_size` values at the start of a buffer of `max_batch() x out_size`; empty when
    /// there is none (`i` not below the last layer, or no buffers yet).
    ///
    /// Panics if layer `i` is fused with the activation after it (its output is never
    /// written): call [`Sequential::keep_output`] first.
    pub fn output_of(&self, i: usize) -> &[f32] {
        assert!(
            !self.is_fused(i),
            "Sequential::output_of({i}): layer {i} is fused with the activation after it; \
             call keep_output({i}) before the forward pass"
        );
        self.acts.get(i).map_or(&[], |a| &a[..])
    }

    /// True when the buffers between the children hold batches of `n`.
    fn sized_for(&self, n: usize) -> bool {
        n <= self.max_batch
            && self.acts.len() == self.layers.len().saturating_sub(1)
            && self
                .acts
                .iter()
                .zip(&self.layers)
                .all(|(a, l)| a.len() >= self.max_batch * l.out_size())
    }
}

impl Layer for Sequential {
    fn in_size(&self) -> usize {
        self.layers.first().map_or(0, |l| l.in_size())
    }
    fn out_size(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out_size())
    }

    fn reserve(&mut self, max_batch: usize) {
        let max_batch = max_batch.max(self.max_batch);
        self.max_batch = max_batch;
        let l = self.layers.len().saturating_sub(1);
        self.acts.resize_with(l, Vec::new);
        self.grads.resize_with(l, Vec::new);
        for ((a, g), layer) in self.acts.iter_mut().zip(&mut self.grads).zip(&self.layers) {
            // Grown, never shrunk: the last forward pass's outputs stay for `backward`.
            let len = max_batch * layer.out_size();
            if a.len() < len {
                a.resize(len, 0.0);
            }
            if g.len() < len {
                g.resize(len, 0.0);
            }
        }
        for layer in &mut self.layers {
            layer.reserve(max_batch);
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        check_forward(self, x, y, n)?;
        if !self.sized_for(n) {
            self.reserve(n);
        }
        self.check_fusion();
        let l = self.layers.len();
        let mut y = Some(y);
        for i in 0..l {
            if i > 0 && self.is_fused(i - 1) {
                // Applied by layer i - 1.
                continue;
            }
            // A fused layer writes where the activation after it would.
            let o = if self.is_fused(i) { i + 1 } else { i };
            let (before, after) = self.acts.split_at_mut(o);
            // Exactly the previous child's output: a child that takes more (a broken chain)
            // gets `Error::Shape`, not the stale rest of the buffer.
            let input: &[f32] = if i == 0 {
                x
            } else {
                &before[i - 1][..n * self.layers[i - 1].out_size()]
            };
            let output: &mut [f32] = if o == l - 1 {
                y.take().expect("the last layer runs once")
            } else {
                &mut after[0]
            };
            self.layers[i].forward(ctx, input, output, n)?;
        }
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
        let l = self.layers.len();
        let mut dx = dx;
        for i in (0..l).rev() {
            if i > 0 && self.is_fused(i - 1) {
                // Differentiated by layer i - 1.
                continue;
            }
            // A fused layer gets the output and gradient of the activation after it.
            let o = if self.is_fused(i) { i + 1 } else { i };
            let input: &[f32] = if i == 0 { x } else { &self.acts[i - 1] };
            let output: &[f32] = if o == l - 1 { y } else { &self.acts[o] };
            let (gb, ga) = self.grads.split_at_mut(i);
            let grad_out: &[f32] = if o == l - 1 { dy } else { &ga[o - i] };
            let grad_in: Option<&mut [f32]> = if i == 0 {
                dx.take()
            } else {
                Some(&mut gb[i - 1])
            };
            self.layers[i].backward(ctx, input, output, grad_out, grad_in, n);
        }
    }

    fn zero_grad(&mut self) {
        for layer in &mut self.layers {
            layer.zero_grad();
        }
    }

    fn for_each_param(&mut self, f: &mut dyn FnMut(&mut [f32], &[f32])) {
        for layer in &mut self.layers {
            layer.for_each_param(f);
        }
    }

    fn visit_state(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let p = match &self.names {
                Some(names) => child_prefix(prefix, &names[i]),
                None => format!("{prefix}{i}."),
            };
            layer.visit_state(&p, f);
        }
    }

    fn for_each_rng(&mut self, f: &mut dyn FnMut(&mut rand_chacha::ChaCha8Rng)) {
        for layer in &mut self.layers {
            layer.for_each_rng(f);
        }
    }

    fn for_each_batch_norm(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        for layer in &mut self.layers {
            layer.for_each_batch_norm(f);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn children(&mut self) -> Vec<&mut dyn Layer> {
        self.layers
            .iter_mut()
            .map(|l| l.as_mut() as &mut dyn Layer)
            .collect()
    }
    fn describe(&self) -> String {
        format!("Sequential(\n{}\n)", self.describe_children().join("\n"))
    }
}

impl Sequential {
    /// One entry per child, `  (name): description`, nested lines indented one more level.
    pub(super) fn describe_children(&self) -> Vec<String> {
        self.layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let name = match &self.names {
                    Some(names) if names[i].is_empty() => "-".to_string(),
                    Some(names) => names[i].clone(),
                    None => i.to_string(),
                };
                // Nested containers indent their lines one more level.
                format!("  ({name}): {}", l.describe().replace('\n', "\n  "))
            })
            .collect()
    }
}
