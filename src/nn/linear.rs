//! Fully connected layer, `y = x W^T + b`, PyTorch's `nn.Linear`.
//!
//! The weight is stored transposed, `[in, out]` (checkpoints still see PyTorch's `[out, in]`):
//! then each input feature owns a contiguous row of weights, which lets the input layer skip the
//! zeros of its input. MNIST pixels are about 81% zero, so for the first layer, which holds 80%
//! of the network's multiply-adds, forward and weight gradient touch only the nonzero pixels'
//! rows (`y[i,:] += x[i,k] * Wt[k,:]`, `dWt[k,:] += x[i,k] * dy[i,:]`): the same sums in a
//! different order, about five times fewer operations.

use super::{check_forward, Ctx, Layer, TensorMut};
use crate::kernels::matmul::{matmul, Trans};
use crate::kernels::{join, sparse};
use crate::Result;

/// Inputs denser than this go through the dense product.
const SPARSE_MAX_DENSITY: f64 = 0.4;

/// `y = x W^T + b` on `n x in_features` inputs (see the module doc for the weight's layout).
///
/// Works without `reserve`; `backward` computes the gradients at the `x` it is given (through
/// the nonzeros gathered by the last forward pass when that pass had the same batch size and
/// took the sparse path, else by dense products).
pub struct Linear {
    /// Features per example in.
    pub in_features: usize,
    /// Features per example out.
    pub out_features: usize,
    /// `[in, out]`, the transpose of PyTorch's `weight`.
    pub weight_t: Vec<f32>,
    /// One per output feature; `None` for `bias=False`.
    pub bias: Option<Vec<f32>>,
    grad_weight_t: Vec<f32>,
    grad_bias: Option<Vec<f32>>,
    /// PyTorch's `[out, in]` layout of the weight, refreshed for each input gradient.
    weight_scratch: Vec<f32>,
    /// Look for zeros in the input (worth it for raw pixels, not for hidden activations).
    pub sparse_input: bool,
    // The sparse path: two blocks of input features (see `kernels::sparse`), and the second
    // block's partial product.
    blocks: [sparse::FeatureBlock; 2],
    partial: Vec<f32>,
    last_sparse: bool,
    /// The batch size of the last successful forward pass (0: none).
    last_n: usize,
}

impl Linear {
    /// Zero-initialized; presets fill the weights.
    pub fn new(in_features: usize, out_features: usize, bias: bool) -> Self {
        Linear {
            in_features,
            out_features,
            weight_t: vec![0.0; in_features * out_features],
            bias: bias.then(|| vec![0.0; out_features]),
            grad_weight_t: vec![0.0; in_features * out_features],
            grad_bias: bias.then(|| vec![0.0; out_features]),
            weight_scratch: vec![0.0; in_features * out_features],
            sparse_input: false,
            blocks: [
                sparse::FeatureBlock::new(0, in_features / 2),
                sparse::FeatureBlock::new(in_features / 2, in_features),
            ],
            partial: Vec::new(),
            last_sparse: false,
            last_n: 0,
        }
    }

    /// The weight gradient of the last backward pass, `[in, out]` like `weight_t` (the
    /// transpose of PyTorch's `weight.grad`).
    pub fn grad_weight_t(&self) -> &[f32] {
        &self.grad_weight_t
    }

    /// The bias gradient of the last backward pass; `None` without a bias.
    pub fn grad_bias(&self) -> Option<&[f32]> {
        self.grad_bias.as_deref()
    }

    /// Set the weight from PyTorch's `[out, in]` layout.
    pub fn set_weight(&mut self, w: &[f32]) {
        let (i, o) = (self.in_features, self.out_features);
        for r in 0..o {
            for c in 0..i {
                self.weight_t[c * o + r] = w[r * i + c];
            }
        }
    }
}

impl Linear {
    /// The forward product through the input's nonzeros, one feature block per thread.
    /// Returns false (nothing usable kept) when the input is too dense for it.
    fn forward_sparse(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> bool {
        let (i, o) = (self.in_features, self.out_features);
        let (wt, bias) = (&self.weight_t, self.bias.as_deref());
        let [b_a, b_b] = &mut self.blocks;
        let y = &mut y[..n * o];
        let partial = &mut self.partial[..n * o];
        let limit = |b: &sparse::FeatureBlock| SPARSE_MAX_DENSITY * (n * (b.k1 - b.k0)) as f64;
        let (ok_a, ok_b) = join(
            ctx.threads,
            || {
                let ok = b_a.gather(x, n, i) as f64 <= limit(b_a);
                if ok {
                    b_a.forward(wt, bias, y, n, o);
                }
                ok
            },
            || {
                let ok = b_b.gather(x, n, i) as f64 <= limit(b_b);
                if ok {
                    b_b.forward(wt, None, partial, n, o);
                }
                ok
            },
        );
        if ok_a && ok_b {
            for (v, &p) in y.iter_mut().zip(partial.iter()) {
                *v += p;
            }
        }
        ok_a && ok_b
    }
}

impl Layer for Linear {
    fn in_size(&self) -> usize {
        self.in_features
    }
    fn out_size(&self) -> usize {
        self.out_features
    }
    fn reserve(&mut self, max_batch: usize) {
        let len = max_batch * self.out_features;
        if self.sparse_input && self.partial.len() < len {
            for b in &mut self.blocks {
                b.reserve(max_batch);
            }
            self.partial.resize(len, 0.0);
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_sparse = false;
        check_forward(self, x, y, n)?;
        let (i, o) = (self.in_features, self.out_features);
        self.last_n = n;
        if self.sparse_input {
            self.reserve(n);
            self.last_sparse = self.forward_sparse(ctx, x, y, n);
        }
        if self.last_sparse {
            return Ok(());
        }
        matmul(y, x, &self.weight_t, n, i, o, Trans::No, false, ctx.threads);
        if let Some(b) = &self.bias {
            for row in y[..n * o].chunks_exact_mut(o) {
                for (v, &bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
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
        let (i, o) = (self.in_features, self.out_features);
        // The gathered nonzeros belong to the last forward's input.
        if self.last_sparse && n == self.last_n {
            let [b_a, b_b] = &mut self.blocks;
            let (g_a, g_b) = self.grad_weight_t.split_at_mut(b_a.k1 * o);
            join(
                ctx.threads,
                || b_a.weight_grad(dy, g_a, n, o),
                || b_b.weight_grad(dy, g_b, n, o),
            );
        } else {
            // dWt = x^T dy  ([i, n] x [n, o])
            matmul(
                &mut self.grad_weight_t,
                x,
                dy,
                i,
                n,
                o,
                Trans::A,
                false,
                ctx.threads,
            );
        }
        if let Some(gb) = &mut self.grad_bias {
            gb.fill(0.0);
            for row in dy[..n * o].chunks_exact(o) {
                for (g, &v) in gb.iter_mut().zip(row) {
                    *g += v;
                }
            }
        }
        if let Some(dx) = dx {
            // dx = dy W  ([n, o] x [o, i]), with W = Wt^T laid out row-major first so that the
            // product streams contiguous rows.
            transpose(&self.weight_t, i, o, &mut self.weight_scratch);
            matmul(
                dx,
                dy,
                &self.weight_scratch,
                n,
                o,
                i,
                Trans::No,
                false,
                ctx.threads,
            );
        }
    }

    fn zero_grad(&mut self) {
        self.grad_weight_t.fill(0.0);
        if let Some(gb) = &mut self.grad_bias {
            gb.fill(0.0);
        }
    }

    fn for_each_param(&mut self, f: &mut dyn FnMut(&mut [f32], &[f32])) {
        f(&mut self.weight_t, &self.grad_weight_t);
        if let (Some(b), Some(gb)) = (&mut self.bias, &self.grad_bias) {
            f(b, gb);
        }
    }

    fn visit_state(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        f(
            &format!("{prefix}weight"),
            &[self.out_features, self.in_features],
            TensorMut::F32T(&mut self.weight_t),
        );
        if let Some(b) = &mut self.bias {
            f(
                &format!("{prefix}bias"),
                &[self.out_features],
                TensorMut::F32(b),
            );
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        format!(
            "Linear({}, {}{})",
            self.in_features,
            self.out_features,
            if self.bias.is_some() {
                ""
            } else {
                ", bias=False"
            }
        )
    }
}

/// `out (cols x rows) = m^T` for a row-major `rows x cols` matrix `m` (16 x 16 blocks in
/// registers where the CPU has AVX-512).
fn transpose(m: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    super::conv::transpose(m, rows, cols, out)
}
