//! Group normalization (PyTorch's `nn.GroupNorm`) and layer normalization, one layer: layer norm
//! is group norm with one group. The arithmetic lives in `kernels::group_norm`; this layer owns
//! gamma and beta (PyTorch's `weight` and `bias`, per channel), their gradients and the
//! per-(example, group) statistics the backward pass reuses.
//!
//! - `GroupNorm::group(G, C, s, ..)`: `nn.GroupNorm(G, C)` on `C x H x W` maps (`s = H * W`),
//!   or on `[C]` features (`s = 1`).
//! - `GroupNorm::layer(C, s, ..)`: for features (`s = 1`) PyTorch's `nn.LayerNorm(C)`; for maps
//!   the normalization over C, H, W of each example with a per-channel affine transform (Wu &
//!   He 2018's layer norm; PyTorch's `nn.LayerNorm([C, H, W])` would learn one gamma per
//!   value instead).
//!
//! No running statistics, no batch dependence: `Train`, `Eval` and `Population` compute the same
//! function, and a batch of one works.

use super::{backward_nothing, check_forward, Ctx, Layer, TensorMut};
use crate::kernels::group_norm::{self as k, Dims};
use crate::Result;

/// Group normalization of `channels` channels of `positions` positions each, in `groups` groups
/// of consecutive channels; layer normalization when `groups == 1` and built by
/// [`GroupNorm::layer`]. Input and output `n x (channels * positions)`.
///
/// Works without `reserve` (the statistics are sized by the first forward pass of a larger
/// batch). `backward` before any forward pass, or with another batch size than the last
/// forward's, sets the gradients of gamma and beta to zero and `dx` to zeros.
pub struct GroupNorm {
    /// Groups of `channels / groups` consecutive channels (1 for layer norm).
    pub groups: usize,
    /// Channels (features).
    pub channels: usize,
    /// Positions per channel (`H * W`; 1 for the fully connected layout).
    pub positions: usize,
    /// Added to the variance before the square root (PyTorch's default 1e-5).
    pub eps: f32,
    /// The scale, one per channel (PyTorch's `weight`); `None` without the affine transform.
    pub gamma: Option<Vec<f32>>,
    /// The shift, one per channel (PyTorch's `bias`); `None` without the affine transform.
    pub beta: Option<Vec<f32>>,
    /// Built as layer norm (for `describe` and export; the arithmetic is group norm's).
    layer_norm: bool,
    grad_gamma: Vec<f32>,
    grad_beta: Vec<f32>,
    mean: Vec<f32>,
    mean_lo: Vec<f32>,
    inv_std: Vec<f32>,
    acc: Vec<f64>,
    /// The batch size of the last successful forward pass; 0: none to differentiate.
    last_n: usize,
}

impl GroupNorm {
    /// `nn.GroupNorm(groups, channels, eps, affine)` on channels of `positions` positions
    /// (`H * W` for maps, 1 for features); gamma = 1, beta = 0 as PyTorch initializes them.
    /// `Err` unless `groups` divides `channels` and every size is at least 1.
    pub fn group(
        groups: usize,
        channels: usize,
        positions: usize,
        eps: f32,
        affine: bool,
    ) -> Result<Self> {
        Dims {
            n: 0,
            c: channels,
            s: positions,
            groups,
        }
        .check()?;
        Ok(GroupNorm {
            groups,
            channels,
            positions,
            eps,
            gamma: affine.then(|| vec![1.0; channels]),
            beta: affine.then(|| vec![0.0; channels]),
            layer_norm: false,
            grad_gamma: vec![0.0; channels],
            grad_beta: vec![0.0; channels],
            mean: Vec::new(),
            mean_lo: Vec::new(),
            inv_std: Vec::new(),
            acc: vec![0.0; 4 * channels],
            last_n: 0,
        })
    }

    /// Layer normalization of each example over all its `channels * positions` values, with a
    /// per-channel gamma and beta: PyTorch's `nn.LayerNorm(channels)` for `positions == 1`;
    /// for maps, group norm with one group (see the module doc). `Err` on a zero size.
    pub fn layer(channels: usize, positions: usize, eps: f32, affine: bool) -> Result<Self> {
        let mut ln = GroupNorm::group(1, channels, positions, eps, affine)?;
        ln.layer_norm = true;
        Ok(ln)
    }

    /// True when built by [`GroupNorm::layer`].
    pub fn is_layer_norm(&self) -> bool {
        self.layer_norm
    }

    /// The gradient of gamma from the last backward pass, one per channel; `None` without the
    /// affine transform.
    pub fn grad_gamma(&self) -> Option<&[f32]> {
        self.gamma.as_ref().map(|_| &self.grad_gamma[..])
    }

    /// The gradient of beta from the last backward pass, one per channel; `None` without the
    /// affine transform.
    pub fn grad_beta(&self) -> Option<&[f32]> {
        self.beta.as_ref().map(|_| &self.grad_beta[..])
    }

    /// The mean and `1 / sqrt(var + eps)` of each (example, group) of the last forward pass,
    /// example-major (`n * groups` each; the mean to f32 precision).
    pub fn last_stats(&self) -> (&[f32], &[f32]) {
        let len = self.last_n * self.groups;
        (&self.mean[..len], &self.inv_std[..len])
    }

    fn dims(&self, n: usize) -> Dims {
        Dims {
            n,
            c: self.channels,
            s: self.positions,
            groups: self.groups,
        }
    }
}

impl Layer for GroupNorm {
    fn in_size(&self) -> usize {
        self.channels * self.positions
    }
    fn out_size(&self) -> usize {
        self.channels * self.positions
    }
    fn reserve(&mut self, max_batch: usize) {
        let len = max_batch * self.groups;
        for v in [&mut self.mean, &mut self.mean_lo, &mut self.inv_std] {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        check_forward(self, x, y, n)?;
        self.reserve(n);
        k::forward(
            x,
            self.dims(n),
            self.eps,
            self.gamma.as_deref(),
            self.beta.as_deref(),
            y,
            &mut self.mean,
            &mut self.mean_lo,
            &mut self.inv_std,
            ctx.threads,
        )?;
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
        if n != self.last_n || n == 0 {
            return backward_nothing(self, dx, n);
        }
        let d = self.dims(n);
        let affine = self.gamma.is_some();
        let (dg, db) = if affine {
            (
                Some(&mut self.grad_gamma[..]),
                Some(&mut self.grad_beta[..]),
            )
        } else {
            (None, None)
        };
        k::backward(
            x,
            dy,
            d,
            self.gamma.as_deref(),
            (&self.mean, &self.mean_lo, &self.inv_std),
            dx,
            dg,
            db,
            &mut self.acc,
            ctx.threads,
        );
    }

    fn zero_grad(&mut self) {
        self.grad_gamma.fill(0.0);
        self.grad_beta.fill(0.0);
    }

    fn for_each_param(&mut self, f: &mut dyn FnMut(&mut [f32], &[f32])) {
        if let Some(g) = &mut self.gamma {
            f(g, &self.grad_gamma);
        }
        if let Some(b) = &mut self.beta {
            f(b, &self.grad_beta);
        }
    }

    fn visit_state(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        let c = [self.channels];
        if let Some(g) = &mut self.gamma {
            f(&format!("{prefix}weight"), &c, TensorMut::F32(g));
        }
        if let Some(b) = &mut self.beta {
            f(&format!("{prefix}bias"), &c, TensorMut::F32(b));
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }

    fn describe(&self) -> String {
        let affine = if self.gamma.is_some() {
            ""
        } else {
            ", affine=False"
        };
        if self.layer_norm {
            let over = if self.positions == 1 {
                String::new()
            } else {
                format!(" x {} positions", self.positions)
            };
            format!(
                "LayerNorm({}{over}, eps={}{affine})",
                self.channels, self.eps
            )
        } else {
            format!(
                "GroupNorm({}, {}, eps={}{affine})",
                self.groups, self.channels, self.eps
            )
        }
    }
}
