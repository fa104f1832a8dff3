//! Fully connected layer, `y = x W^T + b` with PyTorch's weight layout `[out, in]`.

use super::{Ctx, Layer, TensorMut};
use crate::kernels::matmul::{matmul, Trans};
use crate::Result;

pub struct Linear {
    pub in_features: usize,
    pub out_features: usize,
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub grad_weight: Vec<f32>,
    pub grad_bias: Option<Vec<f32>>,
}

impl Linear {
    /// Zero-initialized; presets fill the weights.
    pub fn new(in_features: usize, out_features: usize, bias: bool) -> Self {
        Linear {
            in_features,
            out_features,
            weight: vec![0.0; in_features * out_features],
            bias: bias.then(|| vec![0.0; out_features]),
            grad_weight: vec![0.0; in_features * out_features],
            grad_bias: bias.then(|| vec![0.0; out_features]),
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
    fn reserve(&mut self, _max_batch: usize) {}

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        let (i, o) = (self.in_features, self.out_features);
        matmul(y, x, &self.weight, n, i, o, Trans::B, false, ctx.threads);
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
        // dW = dy^T x  ([o, n] x [n, i])
        matmul(
            &mut self.grad_weight,
            dy,
            x,
            o,
            n,
            i,
            Trans::A,
            false,
            ctx.threads,
        );
        if let Some(gb) = &mut self.grad_bias {
            gb.fill(0.0);
            for row in dy[..n * o].chunks_exact(o) {
                for (g, &v) in gb.iter_mut().zip(row) {
                    *g += v;
                }
            }
        }
        if let Some(dx) = dx {
            // dx = dy W  ([n, o] x [o, i])
            matmul(dx, dy, &self.weight, n, o, i, Trans::No, false, ctx.threads);
        }
    }

    fn for_each_param(&mut self, f: &mut dyn FnMut(&mut [f32], &[f32])) {
        f(&mut self.weight, &self.grad_weight);
        if let (Some(b), Some(gb)) = (&mut self.bias, &self.grad_bias) {
            f(b, gb);
        }
    }

    fn visit_state(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        f(
            &format!("{prefix}weight"),
            &[self.out_features, self.in_features],
            TensorMut::F32(&mut self.weight),
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
