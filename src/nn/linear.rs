//! Fully connected layer, `y = x W^T + b`, PyTorch's `nn.Linear`.
//!
//! The weight is stored transposed, `[in, out]` (checkpoints still see PyTorch's `[out, in]`):
//! then each input feature owns a contiguous row of weights, which lets the input layer skip the
//! zeros of its input. MNIST pixels are about 81% zero, so for the first layer, which holds 80%
//! of the network's multiply-adds, forward and weight gradient touch only the nonzero pixels'
//! rows (`y[i,:] += x[i,k] * Wt[k,:]`, `dWt[k,:] += x[i,k] * dy[i,:]`): the same sums in a
//! different order, about five times fewer operations.

use super::{Ctx, Layer, TensorMut};
use crate::kernels::matmul::{matmul, Trans};
use crate::kernels::sparse;
use crate::Result;

/// Inputs denser than this go through the dense product.
const SPARSE_MAX_DENSITY: f64 = 0.4;

pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    /// `[in, out]`, the transpose of PyTorch's `weight`.
    pub weight_t: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    grad_weight_t: Vec<f32>,
    grad_bias: Option<Vec<f32>>,
    /// Look for zeros in the input (worth it for raw pixels, not for hidden activations).
    pub sparse_input: bool,
    // The nonzeros of the last input, row by row, when the sparse path was taken.
    nz_index: Vec<u32>,
    nz_value: Vec<f32>,
    nz_row_end: Vec<usize>,
    // The same nonzeros grouped by input feature, for the weight gradient.
    col_start: Vec<usize>,
    col_row: Vec<u32>,
    col_value: Vec<f32>,
    last_sparse: bool,
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
            sparse_input: false,
            nz_index: Vec::new(),
            nz_value: Vec::new(),
            nz_row_end: Vec::new(),
            col_start: Vec::new(),
            col_row: Vec::new(),
            col_value: Vec::new(),
            last_sparse: false,
        }
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

impl Layer for Linear {
    fn in_size(&self) -> usize {
        self.in_features
    }
    fn out_size(&self) -> usize {
        self.out_features
    }
    fn reserve(&mut self, max_batch: usize) {
        if self.sparse_input {
            // One slot past the end: the compaction writes before it checks.
            self.nz_index.resize(max_batch * self.in_features + 1, 0);
            self.nz_value.resize(max_batch * self.in_features + 1, 0.0);
            self.nz_row_end.resize(max_batch, 0);
            self.col_start.resize(self.in_features + 1, 0);
            self.col_row.resize(max_batch * self.in_features, 0);
            self.col_value.resize(max_batch * self.in_features, 0.0);
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        let (i, o) = (self.in_features, self.out_features);
        self.last_sparse = self.sparse_input
            && sparse::gather_nonzeros(
                x,
                n,
                i,
                (SPARSE_MAX_DENSITY * (n * i) as f64) as usize,
                &mut self.nz_index,
                &mut self.nz_value,
                &mut self.nz_row_end,
            );
        if self.last_sparse {
            sparse::sparse_matmul(
                &self.nz_index,
                &self.nz_value,
                &self.nz_row_end,
                &self.weight_t,
                self.bias.as_deref(),
                y,
                n,
                o,
            );
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
        if self.last_sparse {
            sparse::columns_of(
                &self.nz_index,
                &self.nz_value,
                &self.nz_row_end,
                n,
                i,
                &mut self.col_start,
                &mut self.col_row,
                &mut self.col_value,
            );
            sparse::sparse_weight_grad(
                &self.col_start,
                &self.col_row,
                &self.col_value,
                dy,
                &mut self.grad_weight_t,
                i,
                o,
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
            // dx = dy Wt^T  ([n, o] x [o, i])
            matmul(
                dx,
                dy,
                &self.weight_t,
                n,
                o,
                i,
                Trans::B,
                false,
                ctx.threads,
            );
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
