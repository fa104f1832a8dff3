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
use crate::kernels::{join, sparse};
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
    // The nonzeros of the last input, each row in a slot of `in_features` entries, when the
    // sparse path was taken; and per-thread workspace for the weight gradient.
    nz_index: Vec<u32>,
    nz_value: Vec<f32>,
    nz_len: Vec<usize>,
    scratch: [sparse::ColumnScratch; 2],
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
            nz_len: Vec::new(),
            scratch: Default::default(),
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

impl Linear {
    /// The forward product through the input's nonzeros, rows split over two threads when
    /// allowed. Returns false (nothing usable kept) when the input is too dense for it.
    fn forward_sparse(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> bool {
        let (i, o) = (self.in_features, self.out_features);
        let h = n.div_ceil(2);
        let (idx_a, idx_b) = self.nz_index[..n * i].split_at_mut(h * i);
        let (val_a, val_b) = self.nz_value[..n * i].split_at_mut(h * i);
        let (len_a, len_b) = self.nz_len[..n].split_at_mut(h);
        let (y_a, y_b) = y[..n * o].split_at_mut(h * o);
        let (x_a, x_b) = x[..n * i].split_at(h * i);
        let (wt, bias) = (&self.weight_t, self.bias.as_deref());
        let half = |x: &[f32],
                    idx: &mut [u32],
                    val: &mut [f32],
                    len: &mut [usize],
                    y: &mut [f32]| {
            let mut total = 0;
            for (r, l) in len.iter_mut().enumerate() {
                let slot = r * i..(r + 1) * i;
                *l = sparse::gather_row(&x[slot.clone()], &mut idx[slot.clone()], &mut val[slot]);
                total += *l;
            }
            let dense_enough = total as f64 > SPARSE_MAX_DENSITY * (len.len() * i) as f64;
            if !dense_enough {
                sparse::sparse_matmul(idx, val, len, i, wt, bias, y, o);
            }
            !dense_enough
        };
        let (a, b) = join(
            ctx.threads,
            || half(x_a, idx_a, val_a, len_a, y_a),
            || half(x_b, idx_b, val_b, len_b, y_b),
        );
        a && b
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
            let i = self.in_features;
            self.nz_index.resize(max_batch * i, 0);
            self.nz_value.resize(max_batch * i, 0.0);
            self.nz_len.resize(max_batch, 0);
            for (h, s) in self.scratch.iter_mut().enumerate() {
                let width = if h == 0 { i / 2 } else { i - i / 2 };
                s.reserve(width, max_batch * i);
            }
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        let (i, o) = (self.in_features, self.out_features);
        self.last_sparse = self.sparse_input && self.forward_sparse(ctx, x, y, n);
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
        if self.last_sparse {
            let (k_mid, threads) = (i / 2, ctx.threads);
            let (idx, val, len) = (&self.nz_index, &self.nz_value, &self.nz_len[..n]);
            let (g_a, g_b) = self.grad_weight_t.split_at_mut(k_mid * o);
            let [s_a, s_b] = &mut self.scratch;
            join(
                threads,
                || sparse::sparse_weight_grad(idx, val, len, i, 0, k_mid, dy, g_a, o, s_a),
                || sparse::sparse_weight_grad(idx, val, len, i, k_mid, i, dy, g_b, o, s_b),
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
