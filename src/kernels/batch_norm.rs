//! The batch-normalizing transform (Ioffe & Szegedy 2015, section 3, Algorithm 1) and its
//! backward pass, for one layer's worth of activations.
//!
//! Layout: `x` holds `n` examples of `c` features, each feature a run of `s` positions:
//! element (i, ch, p) sits at `(i * c + ch) * s + p`. `s = 1` is the fully connected layout NC
//! (one statistic per feature over the mini-batch); `s = H * W` is the convolutional layout NCHW
//! (one statistic per feature map over the mini-batch and all positions, `m = n * s`).
//!
//! Algorithm 1, per feature over the m values of the mini-batch B:
//!   mu_B      = 1/m sum x_i                      (mini-batch mean)
//!   sigma2_B  = 1/m sum (x_i - mu_B)^2           (mini-batch variance, biased)
//!   xhat_i    = (x_i - mu_B) / sqrt(sigma2_B + eps)
//!   y_i       = gamma * xhat_i + beta
//!
//! Backward (the paper's chain rule, section 3), with dxhat_i = dy_i * gamma:
//!   dsigma2 = sum dxhat_i (x_i - mu_B) * (-1/2) (sigma2_B + eps)^(-3/2)
//!   dmu     = -sum dxhat_i / sqrt(sigma2_B + eps)        (the dsigma2 term of dmu sums to zero)
//!   dx_i    = dxhat_i / sqrt(sigma2_B + eps) + dsigma2 * 2 (x_i - mu_B) / m + dmu / m
//!   dgamma  = sum dy_i xhat_i,   dbeta = sum dy_i
//! which collapses to the fused form used here:
//!   dx_i = gamma / (m sqrt(sigma2_B + eps)) * (m dy_i - dbeta - xhat_i dgamma).
//! The `reference` module below evaluates the unfused equations in f64; tests check the two agree.
//!
//! Statistics are computed in two passes with f64 accumulators: E[x^2] - E[x]^2 in f32 loses all
//! precision when the mean is large against the spread (mean 1e4, std 1e-2), and even a
//! two-pass f32 sum drifts over the 25,088 values of a convolutional feature map.

use crate::{Error, Result};

/// Shape of a batch as seen by the kernels: `n` examples, `c` features, `s` positions each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    pub n: usize,
    pub c: usize,
    pub s: usize,
}

impl Dims {
    /// Values per statistic.
    pub fn m(&self) -> usize {
        self.n * self.s
    }
    pub fn len(&self) -> usize {
        self.n * self.c * self.s
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Mini-batch mean and biased variance of each feature (Algorithm 1, lines 1-2).
///
/// The mean comes back as two f32s, `mean + mean_lo`: with a mean of 1e4 one f32 ulp is 1e-3,
/// a tenth of a standard deviation of 1e-2, so `x - mean` must subtract the rounding error too
/// (`(x - mean) - mean_lo`, where the first difference is exact for x near the mean).
pub fn batch_stats(
    x: &[f32],
    d: Dims,
    mean: &mut [f32],
    mean_lo: &mut [f32],
    var: &mut [f32],
) -> Result<()> {
    let m = d.m();
    if m < 2 {
        return Err(Error::BatchTooSmall { m });
    }
    debug_assert!(x.len() >= d.len() && mean.len() >= d.c && var.len() >= d.c);
    let inv_m = 1.0 / m as f64;
    for ch in 0..d.c {
        let mut sum = 0.0f64;
        for i in 0..d.n {
            let run = &x[(i * d.c + ch) * d.s..][..d.s];
            sum += run.iter().map(|&v| v as f64).sum::<f64>();
        }
        let mu = sum * inv_m;
        let mut sq = 0.0f64;
        for i in 0..d.n {
            let run = &x[(i * d.c + ch) * d.s..][..d.s];
            sq += run
                .iter()
                .map(|&v| {
                    let t = v as f64 - mu;
                    t * t
                })
                .sum::<f64>();
        }
        mean[ch] = mu as f32;
        mean_lo[ch] = (mu - mean[ch] as f64) as f32;
        var[ch] = (sq * inv_m) as f32;
    }
    Ok(())
}

/// The fully connected case (`s == 1`) is the hot one in the MLP: there the per-feature loops
/// above stride through memory, so this version walks rows and keeps per-feature f64 sums in
/// the caller's workspace (`acc`, at least `2 * c` long).
pub fn batch_stats_nc(
    x: &[f32],
    n: usize,
    c: usize,
    mean: &mut [f32],
    mean_lo: &mut [f32],
    var: &mut [f32],
    acc: &mut [f64],
) -> Result<()> {
    if n < 2 {
        return Err(Error::BatchTooSmall { m: n });
    }
    let (sum, sq) = acc[..2 * c].split_at_mut(c);
    sum.fill(0.0);
    sq.fill(0.0);
    for row in x[..n * c].chunks_exact(c) {
        for (s, &v) in sum.iter_mut().zip(row) {
            *s += v as f64;
        }
    }
    let inv_m = 1.0 / n as f64;
    for s in sum.iter_mut() {
        *s *= inv_m;
    }
    for row in x[..n * c].chunks_exact(c) {
        for ((q, &v), &mu) in sq.iter_mut().zip(row).zip(sum.iter()) {
            let t = v as f64 - mu;
            *q += t * t;
        }
    }
    for ch in 0..c {
        mean[ch] = sum[ch] as f32;
        mean_lo[ch] = (sum[ch] - mean[ch] as f64) as f32;
        var[ch] = (sq[ch] * inv_m) as f32;
    }
    Ok(())
}

/// `inv_std[ch] = 1 / sqrt(var[ch] + eps)`, computed in f64 then rounded once.
pub fn inv_std(var: &[f32], eps: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(var) {
        *o = (1.0 / (v as f64 + eps as f64).sqrt()) as f32;
    }
}

/// Normalize, scale and shift (Algorithm 1, lines 3-4), given per-feature `mean` and `inv_std`
/// (from the mini-batch in training, from inference statistics otherwise). Writes `xhat` when
/// asked, for the backward pass. `gamma`/`beta` are `None` when the affine part is switched off.
#[allow(clippy::too_many_arguments)]
pub fn normalize(
    x: &[f32],
    d: Dims,
    mean: &[f32],
    mean_lo: &[f32],
    inv_std: &[f32],
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
    mut xhat: Option<&mut [f32]>,
) {
    if d.s == 1 {
        let c = d.c;
        for i in 0..d.n {
            let xr = &x[i * c..][..c];
            let yr = &mut y[i * c..][..c];
            match (gamma, beta) {
                (Some(g), Some(b)) => {
                    for ch in 0..c {
                        let h = (xr[ch] - mean[ch] - mean_lo[ch]) * inv_std[ch];
                        yr[ch] = h * g[ch] + b[ch];
                    }
                }
                _ => {
                    for ch in 0..c {
                        yr[ch] = (xr[ch] - mean[ch] - mean_lo[ch]) * inv_std[ch];
                    }
                }
            }
            if let Some(h) = xhat.as_deref_mut() {
                let hr = &mut h[i * c..][..c];
                for ch in 0..c {
                    hr[ch] = (xr[ch] - mean[ch] - mean_lo[ch]) * inv_std[ch];
                }
            }
        }
        return;
    }
    for i in 0..d.n {
        for ch in 0..d.c {
            let off = (i * d.c + ch) * d.s;
            let (mu, lo, is) = (mean[ch], mean_lo[ch], inv_std[ch]);
            let (g, b) = match (gamma, beta) {
                (Some(g), Some(b)) => (g[ch], b[ch]),
                _ => (1.0, 0.0),
            };
            let xr = &x[off..off + d.s];
            if let Some(h) = xhat.as_deref_mut() {
                for (hv, &xv) in h[off..off + d.s].iter_mut().zip(xr) {
                    *hv = (xv - mu - lo) * is;
                }
            }
            for (yv, &xv) in y[off..off + d.s].iter_mut().zip(xr) {
                *yv = (xv - mu - lo) * is * g + b;
            }
        }
    }
}

/// Per-feature `sum dy` and `sum dy * xhat` (= dbeta and dgamma), in f64.
fn grad_sums(dy: &[f32], xhat: &[f32], d: Dims, sum_dy: &mut [f64], sum_dy_xhat: &mut [f64]) {
    sum_dy[..d.c].fill(0.0);
    sum_dy_xhat[..d.c].fill(0.0);
    if d.s == 1 {
        let c = d.c;
        for i in 0..d.n {
            let dr = &dy[i * c..][..c];
            let hr = &xhat[i * c..][..c];
            for ch in 0..c {
                sum_dy[ch] += dr[ch] as f64;
                sum_dy_xhat[ch] += (dr[ch] * hr[ch]) as f64;
            }
        }
        return;
    }
    for i in 0..d.n {
        for ch in 0..d.c {
            let off = (i * d.c + ch) * d.s;
            let (mut a, mut b) = (0.0f64, 0.0f64);
            for (&g, &h) in dy[off..off + d.s].iter().zip(&xhat[off..off + d.s]) {
                a += g as f64;
                b += (g * h) as f64;
            }
            sum_dy[ch] += a;
            sum_dy_xhat[ch] += b;
        }
    }
}

/// dgamma = sum dy * xhat and dbeta = sum dy per feature (written when asked), returning the
/// two f64 sums, which live in `acc`.
fn param_grads<'a>(
    dy: &[f32],
    xhat: &[f32],
    d: Dims,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    acc: &'a mut [f64],
) -> (&'a mut [f64], &'a mut [f64]) {
    let (sum_dy, sum_dy_xhat) = acc[..2 * d.c].split_at_mut(d.c);
    grad_sums(dy, xhat, d, sum_dy, sum_dy_xhat);
    if let Some(dg) = dgamma {
        for (o, &v) in dg.iter_mut().zip(sum_dy_xhat.iter()) {
            *o = v as f32;
        }
    }
    if let Some(db) = dbeta {
        for (o, &v) in db.iter_mut().zip(sum_dy.iter()) {
            *o = v as f32;
        }
    }
    (sum_dy, sum_dy_xhat)
}

/// Backward pass of training-mode BN in the fused closed form (see the module docs).
/// `acc` is caller workspace of at least `2 * c` f64. Writes `dx` when given, and
/// `dgamma`/`dbeta` when the affine part is on.
#[allow(clippy::too_many_arguments)]
pub fn backward_train(
    dy: &[f32],
    xhat: &[f32],
    inv_std: &[f32],
    gamma: Option<&[f32]>,
    d: Dims,
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    acc: &mut [f64],
) {
    let (sum_dy, sum_dy_xhat) = param_grads(dy, xhat, d, dgamma, dbeta, acc);
    let Some(dx) = dx else { return };
    let m = d.m() as f64;
    // dx = k * (dy - a - xhat * b) with k = gamma * inv_std, a = sum_dy / m, b = sum_dy_xhat / m.
    let c = d.c;
    for ch in 0..c {
        sum_dy[ch] /= m;
        sum_dy_xhat[ch] /= m;
    }
    if d.s == 1 {
        for i in 0..d.n {
            let dr = &dy[i * c..][..c];
            let hr = &xhat[i * c..][..c];
            let xr = &mut dx[i * c..][..c];
            for ch in 0..c {
                let k = gamma.map_or(1.0, |g| g[ch]) * inv_std[ch];
                let a = sum_dy[ch] as f32;
                let b = sum_dy_xhat[ch] as f32;
                xr[ch] = k * (dr[ch] - a - hr[ch] * b);
            }
        }
        return;
    }
    let mut coef = [0f32; 3];
    for ch in 0..c {
        let g = gamma.map_or(1.0, |g| g[ch]);
        coef[0] = g * inv_std[ch];
        coef[1] = sum_dy[ch] as f32;
        coef[2] = sum_dy_xhat[ch] as f32;
        for i in 0..d.n {
            let off = (i * c + ch) * d.s;
            for ((o, &g), &h) in dx[off..off + d.s]
                .iter_mut()
                .zip(&dy[off..off + d.s])
                .zip(&xhat[off..off + d.s])
            {
                *o = coef[0] * (g - coef[1] - h * coef[2]);
            }
        }
    }
}

/// Backward pass in inference mode, where the statistics are constants:
/// `dx = dy * gamma * inv_std`; dgamma and dbeta as in training.
#[allow(clippy::too_many_arguments)]
pub fn backward_eval(
    dy: &[f32],
    xhat: &[f32],
    inv_std: &[f32],
    gamma: Option<&[f32]>,
    d: Dims,
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    acc: &mut [f64],
) {
    param_grads(dy, xhat, d, dgamma, dbeta, acc);
    if let Some(dx) = dx {
        for i in 0..d.n {
            for ch in 0..d.c {
                let k = gamma.map_or(1.0, |g| g[ch]) * inv_std[ch];
                let off = (i * d.c + ch) * d.s;
                for (o, &g) in dx[off..off + d.s].iter_mut().zip(&dy[off..off + d.s]) {
                    *o = g * k;
                }
            }
        }
    }
}

/// How running statistics follow the mini-batch statistics during training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RunningAverage {
    /// PyTorch's convention: `running = (1 - momentum) * running + momentum * batch`.
    Exponential { momentum: f32 },
    /// PyTorch's `momentum=None`: the plain average of all batches seen so far.
    Cumulative,
}

impl RunningAverage {
    /// Parse a momentum in (0, 1] or `cumulative`.
    pub fn parse(s: &str) -> crate::Result<RunningAverage> {
        if s == "cumulative" {
            return Ok(RunningAverage::Cumulative);
        }
        match s.parse::<f32>() {
            Ok(m) if m > 0.0 && m <= 1.0 => Ok(RunningAverage::Exponential { momentum: m }),
            _ => Err(Error::config(
                "--bn-momentum",
                format!("'{s}' (expected a number in (0, 1] or 'cumulative')"),
            )),
        }
    }
}

/// Update running mean and variance after a training step. The variance follows the unbiased
/// batch variance `m / (m - 1) * sigma2_B`, as PyTorch does. `batches_tracked` is the count
/// after this update (at least 1).
pub fn update_running(
    running_mean: &mut [f32],
    running_var: &mut [f32],
    batch_mean: &[f32],
    batch_var: &[f32],
    m: usize,
    avg: RunningAverage,
    batches_tracked: i64,
) {
    let factor = match avg {
        RunningAverage::Exponential { momentum } => momentum as f64,
        RunningAverage::Cumulative => 1.0 / batches_tracked.max(1) as f64,
    };
    let unbias = m as f64 / (m as f64 - 1.0);
    for ch in 0..running_mean.len() {
        let rm = running_mean[ch] as f64;
        let rv = running_var[ch] as f64;
        running_mean[ch] = ((1.0 - factor) * rm + factor * batch_mean[ch] as f64) as f32;
        running_var[ch] = ((1.0 - factor) * rv + factor * unbias * batch_var[ch] as f64) as f32;
    }
}

/// The paper's Algorithm 2, lines 8-11: population statistics as averages over training
/// mini-batches. Feed it each batch's mean and biased variance; `finish` gives
/// E[x] = E_B[mu_B] and Var[x] = m/(m-1) E_B[sigma2_B].
#[derive(Clone, Debug, Default)]
pub struct PopulationStats {
    sum_mean: Vec<f64>,
    sum_var: Vec<f64>,
    batches: usize,
    m: usize,
}

impl PopulationStats {
    pub fn new(c: usize) -> Self {
        PopulationStats {
            sum_mean: vec![0.0; c],
            sum_var: vec![0.0; c],
            batches: 0,
            m: 0,
        }
    }

    pub fn add_batch(&mut self, batch_mean: &[f32], batch_var: &[f32], m: usize) {
        for (s, &v) in self.sum_mean.iter_mut().zip(batch_mean) {
            *s += v as f64;
        }
        for (s, &v) in self.sum_var.iter_mut().zip(batch_var) {
            *s += v as f64;
        }
        self.batches += 1;
        // Algorithm 2 assumes one mini-batch size m; a smaller last batch would change the
        // correction slightly, so callers use full batches only.
        self.m = m;
    }

    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Writes E[x] and Var[x]; false when no batch was seen.
    pub fn finish(&self, mean: &mut [f32], var: &mut [f32]) -> bool {
        if self.batches == 0 || self.m < 2 {
            return false;
        }
        let b = self.batches as f64;
        let unbias = self.m as f64 / (self.m as f64 - 1.0);
        for ch in 0..mean.len() {
            mean[ch] = (self.sum_mean[ch] / b) as f32;
            var[ch] = (unbias * self.sum_var[ch] / b) as f32;
        }
        true
    }
}

/// The slow, obviously-correct twin in f64: Algorithm 1 and the paper's unfused backward
/// equations, written line by line. Used by tests only.
pub mod reference {
    use super::Dims;

    pub struct Forward {
        pub y: Vec<f64>,
        pub mean: Vec<f64>,
        pub var: Vec<f64>,
    }

    fn idx(d: Dims, i: usize, ch: usize, p: usize) -> usize {
        (i * d.c + ch) * d.s + p
    }

    pub fn forward_train(x: &[f64], d: Dims, gamma: &[f64], beta: &[f64], eps: f64) -> Forward {
        let m = d.m() as f64;
        let mut y = vec![0.0; d.len()];
        let mut mean = vec![0.0; d.c];
        let mut var = vec![0.0; d.c];
        for ch in 0..d.c {
            let mut s = 0.0;
            for i in 0..d.n {
                for p in 0..d.s {
                    s += x[idx(d, i, ch, p)];
                }
            }
            let mu = s / m;
            let mut q = 0.0;
            for i in 0..d.n {
                for p in 0..d.s {
                    q += (x[idx(d, i, ch, p)] - mu).powi(2);
                }
            }
            let v = q / m;
            for i in 0..d.n {
                for p in 0..d.s {
                    let k = idx(d, i, ch, p);
                    y[k] = gamma[ch] * (x[k] - mu) / (v + eps).sqrt() + beta[ch];
                }
            }
            mean[ch] = mu;
            var[ch] = v;
        }
        Forward { y, mean, var }
    }

    /// Returns (dx, dgamma, dbeta) from the paper's chain rule, term by term.
    pub fn backward_train(
        x: &[f64],
        dy: &[f64],
        d: Dims,
        gamma: &[f64],
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let m = d.m() as f64;
        let f = forward_train(x, d, gamma, &vec![0.0; d.c], eps);
        let mut dx = vec![0.0; d.len()];
        let mut dgamma = vec![0.0; d.c];
        let mut dbeta = vec![0.0; d.c];
        for ch in 0..d.c {
            let (mu, v) = (f.mean[ch], f.var[ch]);
            let sd = (v + eps).sqrt();
            let (mut dvar, mut dmu_a, mut dmu_b) = (0.0, 0.0, 0.0);
            for i in 0..d.n {
                for p in 0..d.s {
                    let k = idx(d, i, ch, p);
                    let dxhat = dy[k] * gamma[ch];
                    dvar += dxhat * (x[k] - mu) * -0.5 * (v + eps).powf(-1.5);
                    dmu_a += -dxhat / sd;
                    dmu_b += -2.0 * (x[k] - mu) / m;
                    dgamma[ch] += dy[k] * (x[k] - mu) / sd;
                    dbeta[ch] += dy[k];
                }
            }
            let dmu = dmu_a + dvar * dmu_b;
            for i in 0..d.n {
                for p in 0..d.s {
                    let k = idx(d, i, ch, p);
                    let dxhat = dy[k] * gamma[ch];
                    dx[k] = dxhat / sd + dvar * 2.0 * (x[k] - mu) / m + dmu / m;
                }
            }
        }
        (dx, dgamma, dbeta)
    }
}
