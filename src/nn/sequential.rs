//! A chain of layers, named "0", "1", ... as in PyTorch's `nn.Sequential`, or with explicit
//! names (`Sequential::named`, see `named.rs`) for a module whose children are attributes. It
//! owns the intermediate activations and their gradients, sized once by `reserve`.

use super::named::child_prefix;
use super::{BatchNorm, Ctx, Layer, TensorMut};
use crate::Result;

pub struct Sequential {
    pub layers: Vec<Box<dyn Layer>>,
    /// Each child's `state_dict` name; `None` for PyTorch's indices "0", "1", ...
    pub(super) names: Option<Vec<String>>,
    /// acts[i] is the output of layers[i], for every layer but the last (which writes to the
    /// caller's buffer).
    acts: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    max_batch: usize,
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
        }
    }

    /// The batch size `reserve` sized the buffers for.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The output of layer `i` from the last forward pass (`i` below the last layer), as
    /// `n x out_size` values.
    pub fn output_of(&self, i: usize) -> &[f32] {
        &self.acts[i]
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
        self.max_batch = max_batch;
        let l = self.layers.len();
        self.acts = (0..l.saturating_sub(1))
            .map(|i| vec![0.0; max_batch * self.layers[i].out_size()])
            .collect();
        self.grads = self.acts.iter().map(|a| vec![0.0; a.len()]).collect();
        for layer in &mut self.layers {
            layer.reserve(max_batch);
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        debug_assert!(n <= self.max_batch);
        let l = self.layers.len();
        for i in 0..l {
            let (before, after) = self.acts.split_at_mut(i);
            let input: &[f32] = if i == 0 { x } else { &before[i - 1] };
            let output: &mut [f32] = if i == l - 1 { y } else { &mut after[0] };
            self.layers[i].forward(ctx, input, output, n)?;
        }
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
        let l = self.layers.len();
        let mut dx = dx;
        for i in (0..l).rev() {
            let input: &[f32] = if i == 0 { x } else { &self.acts[i - 1] };
            let output: &[f32] = if i == l - 1 { y } else { &self.acts[i] };
            let (gb, ga) = self.grads.split_at_mut(i);
            let grad_out: &[f32] = if i == l - 1 { dy } else { &ga[0] };
            let grad_in: Option<&mut [f32]> = if i == 0 {
                dx.take()
            } else {
                Some(&mut gb[i - 1])
            };
            self.layers[i].backward(ctx, input, output, grad_out, grad_in, n);
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
