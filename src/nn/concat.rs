//! Parallel branches on the same input, outputs concatenated on channels: PyTorch's
//! `torch.cat([b1(x), b2(x), ...], 1)` as in an Inception block.
//!
//! In NCHW each example's output of a branch is one contiguous run of `C_b*H*W` values, so
//! concatenating on channels is concatenating those runs per example, in branch order. The
//! branches must produce maps of the same `H x W` (not checked here: a layer knows only its
//! feature counts).
//!
//! The container owns each branch's output (needed again by the branch's backward pass), the
//! branch's slice of the output gradient, and one input-gradient buffer: the first branch writes
//! dx directly, each later one writes the buffer, which is then added to dx (the input feeds
//! every branch, so its gradient is the sum).

use super::named::{check_names, child_prefix};
use super::{backward_nothing, check_forward, par_batch, span, BatchNorm, Ctx, Layer, TensorMut};
use crate::kernels::{par_ranges, Disjoint};
use crate::{Error, Result};

/// Branches on the same input, outputs joined on channels (see the module doc).
///
/// Works without `reserve`. `backward` before any forward pass, or with another batch size
/// than the last forward's, sets every branch's parameter gradients to zero and `dx` to zeros.
pub struct Concat {
    /// The branches in concatenation order.
    pub branches: Vec<Box<dyn Layer>>,
    /// Each branch's `state_dict` name (`b1`, `b2`, ...; empty adds no level).
    pub names: Vec<String>,
    outs: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    dx_branch: Vec<f32>,
    max_batch: usize,
    /// The batch size of the last successful forward pass (0: none).
    last_n: usize,
}

impl Concat {
    /// Branches in concatenation order with their names. All take the same input.
    ///
    /// An error if there is no branch, a name contains a dot or is used twice, or the branches
    /// take different input sizes.
    pub fn new(branches: Vec<(&str, Box<dyn Layer>)>) -> Result<Self> {
        let (names, branches): (Vec<String>, Vec<Box<dyn Layer>>) = branches
            .into_iter()
            .map(|(n, l)| (n.to_string(), l))
            .unzip();
        let Some(first) = branches.first() else {
            return Err(Error::Shape("Concat needs at least one branch".into()));
        };
        check_names(&names)?;
        let in_size = first.in_size();
        for (n, b) in names.iter().zip(&branches) {
            if b.in_size() != in_size {
                return Err(Error::Shape(format!(
                    "Concat: branch '{n}' takes {} inputs, branch '{}' takes {in_size}",
                    b.in_size(),
                    names[0]
                )));
            }
        }
        Ok(Concat {
            branches,
            names,
            outs: Vec::new(),
            grads: Vec::new(),
            dx_branch: Vec::new(),
            max_batch: 0,
            last_n: 0,
        })
    }

    /// The output of branch `b` from the last forward pass, `n x out_size_b` at the start of
    /// its buffer; empty when there is none (no such branch, or no buffers yet).
    pub fn output_of(&self, b: usize) -> &[f32] {
        self.outs.get(b).map_or(&[], |o| &o[..])
    }

    /// True when the buffers hold batches of `n`.
    fn sized_for(&self, n: usize) -> bool {
        n <= self.max_batch
            && self.outs.len() == self.branches.len()
            && self
                .outs
                .iter()
                .zip(&self.branches)
                .all(|(o, b)| o.len() >= self.max_batch * b.out_size())
            && (self.branches.len() < 2 || self.dx_branch.len() >= self.max_batch * self.in_size())
    }
}

impl Layer for Concat {
    fn in_size(&self) -> usize {
        self.branches[0].in_size()
    }
    fn out_size(&self) -> usize {
        self.branches.iter().map(|b| b.out_size()).sum()
    }

    fn reserve(&mut self, max_batch: usize) {
        let max_batch = max_batch.max(self.max_batch);
        self.max_batch = max_batch;
        let l = self.branches.len();
        self.outs.resize_with(l, Vec::new);
        self.grads.resize_with(l, Vec::new);
        for ((o, g), b) in self
            .outs
            .iter_mut()
            .zip(&mut self.grads)
            .zip(&self.branches)
        {
            // Grown, never shrunk: the last forward pass's outputs stay for `backward`.
            let len = max_batch * b.out_size();
            if o.len() < len {
                o.resize(len, 0.0);
            }
            if g.len() < len {
                g.resize(len, 0.0);
            }
        }
        let len = max_batch * self.in_size();
        if l > 1 && self.dx_branch.len() < len {
            self.dx_branch.resize(len, 0.0);
        }
        for b in &mut self.branches {
            b.reserve(max_batch);
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        check_forward(self, x, y, n)?;
        if !self.sized_for(n) {
            self.reserve(n);
        }
        let total = self.out_size();
        let mut offset = 0;
        for (branch, out) in self.branches.iter_mut().zip(&mut self.outs) {
            let ob = branch.out_size();
            branch.forward(ctx, x, out, n)?;
            let ys = Disjoint::new(&mut y[..n * total]);
            par_batch(ctx.threads, n, |r| {
                // SAFETY: the example blocks are disjoint.
                let yr = unsafe { ys.range(span(&r, total)) };
                for (dst, src) in yr
                    .chunks_exact_mut(total)
                    .zip(out[span(&r, ob)].chunks_exact(ob))
                {
                    dst[offset..offset + ob].copy_from_slice(src);
                }
            });
            offset += ob;
        }
        self.last_n = n;
        Ok(())
    }

    fn backward(
        &mut self,
        ctx: Ctx,
        x: &[f32],
        _y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        if n != self.last_n {
            return backward_nothing(self, dx, n);
        }
        let (total, isz) = (self.out_size(), self.in_size());
        let mut dx = dx.map(|d| &mut d[..n * isz]);
        let mut offset = 0;
        let parts = self
            .branches
            .iter_mut()
            .zip(&self.outs)
            .zip(&mut self.grads)
            .enumerate();
        for (b, ((branch, out), grad)) in parts {
            let ob = branch.out_size();
            let gs = Disjoint::new(&mut grad[..n * ob]);
            par_batch(ctx.threads, n, |r| {
                // SAFETY: the example blocks are disjoint.
                let gr = unsafe { gs.range(span(&r, ob)) };
                for (dst, src) in gr
                    .chunks_exact_mut(ob)
                    .zip(dy[span(&r, total)].chunks_exact(total))
                {
                    dst.copy_from_slice(&src[offset..offset + ob]);
                }
            });
            offset += ob;
            let grad_in: Option<&mut [f32]> = match dx.as_deref_mut() {
                None => None,
                Some(d) if b == 0 => Some(d),
                Some(_) => Some(&mut self.dx_branch[..n * isz]),
            };
            branch.backward(ctx, x, &out[..n * ob], &grad[..n * ob], grad_in, n);
            if b > 0 {
                if let Some(d) = dx.as_deref_mut() {
                    // Each element adds the branches in order, however the range is split.
                    let (ds, add) = (Disjoint::new(d), &self.dx_branch[..n * isz]);
                    par_ranges(ctx.threads, n * isz, 1 << 15, |r| {
                        // SAFETY: the ranges are disjoint.
                        let dr = unsafe { ds.range(r.clone()) };
                        crate::nn::residual::add_assign(dr, &add[r]);
                    });
                }
            }
        }
    }

    fn zero_grad(&mut self) {
        for b in &mut self.branches {
            b.zero_grad();
        }
    }

    fn for_each_param(&mut self, f: &mut dyn FnMut(&mut [f32], &[f32])) {
        for b in &mut self.branches {
            b.for_each_param(f);
        }
    }

    fn visit_state(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        for (b, name) in self.branches.iter_mut().zip(&self.names) {
            b.visit_state(&child_prefix(prefix, name), f);
        }
    }

    fn for_each_rng(&mut self, f: &mut dyn FnMut(&mut rand_chacha::ChaCha8Rng)) {
        for b in &mut self.branches {
            b.for_each_rng(f);
        }
    }

    fn for_each_batch_norm(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        for b in &mut self.branches {
            b.for_each_batch_norm(f);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn children(&mut self) -> Vec<&mut dyn Layer> {
        self.branches
            .iter_mut()
            .map(|l| l.as_mut() as &mut dyn Layer)
            .collect()
    }
    fn describe(&self) -> String {
        let inner: Vec<String> = self
            .branches
            .iter()
            .zip(&self.names)
            .map(|(b, name)| {
                let name = if name.is_empty() { "-" } else { name };
                format!("  ({name}): {}", b.describe().replace('\n', "\n  "))
            })
            .collect();
        format!("Concat(\n{}\n)", inner.join("\n"))
    }
}
