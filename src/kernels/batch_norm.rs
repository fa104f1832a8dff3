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
//! Statistics are computed in two passes with f64 accumulators: `E[x^2] - E[x]^2` in f32 loses all
//! precision when the mean is large against the spread (mean 1e4, std 1e-2), and even a
//! two-pass f32 sum drifts over the 25,088 values of a convolutional feature map.

use super::{par_ranges, Disjoint};
use crate::{Error, Result};

/// Shape of a batch as seen by the kernels: `n` examples, `c` features, `s` positions each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Examples in the batch.
    pub n: usize,
    /// Features (channels).
    pub c: usize,
    /// Positions per feature (`H * W`; 1 for the fully connected layout).
    pub s: usize,
}

impl Dims {
    /// Values per statistic.
    pub fn m(&self) -> usize {
        self.n * self.s
    }
    /// Values in the batch, `n * c * s`.
    pub fn len(&self) -> usize {
        self.n * self.c * self.s
    }
    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A nonlinearity applied to BN's output in the same pass (the BN + ReLU and BN + sigmoid
/// fusion): `normalize` writes `act(gamma * xhat + beta)` with the arithmetic of the separate
/// layer (`kernels::activation`), so a fused network computes the same bits as an unfused one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Act {
    /// No activation: BN's output as it is.
    #[default]
    Identity,
    /// `max(z, 0)` as `relu_forward` (0 for NaN).
    Relu,
    /// `1 / (1 + e^-z)` as `sigmoid_forward`.
    Sigmoid,
}

impl Act {
    /// `act(z)` for one value, as the separate layer's kernel computes it.
    #[inline(always)]
    fn apply(self, z: f32) -> f32 {
        match self {
            Act::Identity => z,
            Act::Relu => {
                if z > 0.0 {
                    z
                } else {
                    0.0
                }
            }
            Act::Sigmoid => 1.0 / (1.0 + super::activation::exp(-z)),
        }
    }
}

/// The backward pass of a BN layer fused with a ReLU, without the ReLU's output: the gradient
/// passes where `z = xhat * gamma + beta` (recomputed exactly as the forward pass computed it)
/// is positive, as `relu_backward` passes it where the output is positive.
#[derive(Clone, Copy)]
pub struct ReluMask<'a> {
    /// The scale the forward pass used (`None`: 1).
    pub gamma: Option<&'a [f32]>,
    /// The shift the forward pass used (`None`: 0).
    pub beta: Option<&'a [f32]>,
}

impl ReluMask<'_> {
    /// Feature `ch`'s scale and shift.
    #[inline(always)]
    fn affine(&self, ch: usize) -> (f32, f32) {
        match (self.gamma, self.beta) {
            (Some(g), Some(b)) => (g[ch], b[ch]),
            _ => (1.0, 0.0),
        }
    }
}

/// `dy` where `z > 0`, else 0 (`relu_backward`'s rule at the pre-activation).
#[inline(always)]
fn pass(z: f32, dy: f32) -> f32 {
    if z > 0.0 {
        dy
    } else {
        0.0
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
    threads: usize,
) -> Result<()> {
    let m = d.m();
    if m < 2 {
        return Err(Error::BatchTooSmall { m });
    }
    debug_assert!(x.len() >= d.len() && mean.len() >= d.c && var.len() >= d.c);
    // Each feature's statistics are its own: the threads take blocks of features.
    let (ms, ls, vs) = (
        Disjoint::new(&mut mean[..d.c]),
        Disjoint::new(&mut mean_lo[..d.c]),
        Disjoint::new(&mut var[..d.c]),
    );
    par_ranges(threads, d.c, min_features(d), |r| {
        // SAFETY: the feature blocks are disjoint.
        let (m, l, v) = unsafe {
            (
                ms.range(r.clone()),
                ls.range(r.clone()),
                vs.range(r.clone()),
            )
        };
        stats_features(x, d, r.start, m, l, v);
    });
    Ok(())
}

/// Values a piece of parallel work should hold at least: below this, handing it to another
/// thread costs more than it saves (the fully connected layers of the Figure 1 MLP, 60 x 100
/// values, stay on one thread).
const MIN_PIECE_VALUES: usize = 1 << 14;

/// The fewest features per piece of a per-feature split.
fn min_features(d: Dims) -> usize {
    MIN_PIECE_VALUES.div_ceil(d.m().max(1))
}

/// The fewest examples per piece of a split of the batch.
fn min_examples(d: Dims) -> usize {
    MIN_PIECE_VALUES.div_ceil((d.c * d.s).max(1))
}

/// `batch_stats` for the features `c0 .. c0 + mean.len()`.
fn stats_features(
    x: &[f32],
    d: Dims,
    c0: usize,
    mean: &mut [f32],
    mean_lo: &mut [f32],
    var: &mut [f32],
) {
    let inv_m = 1.0 / d.m() as f64;
    for (j, ((mo, lo), vo)) in mean.iter_mut().zip(mean_lo).zip(var).enumerate() {
        let ch = c0 + j;
        let run = |i: usize| &x[(i * d.c + ch) * d.s..][..d.s];
        // The next example's run is `c * s` values on: start loading it while on this one.
        let ahead = |i: usize| {
            if i + 1 < d.n {
                super::prefetch(run(i + 1));
            }
        };
        let mut acc = [0f64; LANES];
        for i in 0..d.n {
            ahead(i);
            add_f64(run(i), &mut acc);
        }
        let mu = reduce(&acc) * inv_m;
        let mut acc = [0f64; LANES];
        for i in 0..d.n {
            ahead(i);
            add_sq_dev(run(i), mu, &mut acc);
        }
        *mo = mu as f32;
        *lo = (mu - *mo as f64) as f32;
        *vo = (reduce(&acc) * inv_m) as f32;
    }
}

/// Lanes of the f64 accumulators below: enough independent sums to hide the add latency, and
/// a fixed order, so that a sum does not depend on how the work is split.
const LANES: usize = 16;

crate::simd_kernel! {
    /// `acc += v` lane by lane (element `j` of `v` into lane `j % LANES`), in f64. Many
    /// independent sums hide the add latency and vectorize; the lanes are added at the end
    /// (`reduce`), once per feature, in a fixed order.
    fn add_f64(v: &[f32], acc: &mut [f64; LANES]) {
        let chunks = v.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            let c: &[f32; LANES] = c.try_into().expect("chunk of LANES");
            for j in 0..LANES {
                acc[j] += c[j] as f64;
            }
        }
        for (a, &x) in acc.iter_mut().zip(tail) {
            *a += x as f64;
        }
    }
}

crate::simd_kernel! {
    /// `acc += (v - mu)^2`, as `add_f64`.
    fn add_sq_dev(v: &[f32], mu: f64, acc: &mut [f64; LANES]) {
        let chunks = v.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            let c: &[f32; LANES] = c.try_into().expect("chunk of LANES");
            for j in 0..LANES {
                let t = c[j] as f64 - mu;
                acc[j] += t * t;
            }
        }
        for (a, &x) in acc.iter_mut().zip(tail) {
            let t = x as f64 - mu;
            *a += t * t;
        }
    }
}

/// `sa += g` and `sb += g * xhat` (the product in f64) over one run, with
/// `xhat = (x - mu - lo) * is` computed as the forward pass did, and `g` dy, or with a fused
/// ReLU (`relu = Some((gamma, beta))`) dy where `xhat * gamma + beta > 0`, else 0.
#[inline(always)]
fn dy_dyxhat_run(
    dy: &[f32],
    x: &[f32],
    stats: (f32, f32, f32),
    relu: Option<(f32, f32)>,
    sa: &mut [f64; LANES],
    sb: &mut [f64; LANES],
) {
    let (mu, lo, is) = stats;
    let g_of = |h: f32, g: f32| match relu {
        Some((ga, be)) => pass(h * ga + be, g),
        None => g,
    };
    let (cd, cx) = (dy.chunks_exact(LANES), x.chunks_exact(LANES));
    let (td, tx) = (cd.remainder(), cx.remainder());
    for (g, xv) in cd.zip(cx) {
        let g: &[f32; LANES] = g.try_into().expect("chunk of LANES");
        let xv: &[f32; LANES] = xv.try_into().expect("chunk of LANES");
        for j in 0..LANES {
            let h = (xv[j] - mu - lo) * is;
            let g = g_of(h, g[j]);
            sa[j] += g as f64;
            sb[j] += g as f64 * h as f64;
        }
    }
    for j in 0..td.len().min(tx.len()) {
        let h = (tx[j] - mu - lo) * is;
        let g = g_of(h, td[j]);
        sa[j] += g as f64;
        sb[j] += g as f64 * h as f64;
    }
}

crate::simd_kernel! {
    /// `sa += dy` and `sb += dy * xhat` (see `dy_dyxhat_run`).
    fn add_dy_dyxhat(
        dy: &[f32],
        x: &[f32],
        stats: (f32, f32, f32),
        sa: &mut [f64; LANES],
        sb: &mut [f64; LANES],
    ) {
        dy_dyxhat_run(dy, x, stats, None, sa, sb)
    }
}

crate::simd_kernel! {
    /// `add_dy_dyxhat` with dy masked by a fused ReLU of scale and shift `ab`.
    fn add_dy_dyxhat_relu(
        dy: &[f32],
        x: &[f32],
        stats: (f32, f32, f32),
        ab: (f32, f32),
        sa: &mut [f64; LANES],
        sb: &mut [f64; LANES],
    ) {
        dy_dyxhat_run(dy, x, stats, Some(ab), sa, sb)
    }
}

/// The lanes added pairwise, in a fixed order.
#[inline(always)]
fn reduce(acc: &[f64; LANES]) -> f64 {
    let mut w = *acc;
    let mut len = LANES;
    while len > 1 {
        len /= 2;
        for j in 0..len {
            w[j] += w[j + len];
        }
    }
    w[0]
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
    act: Act,
    threads: usize,
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
        // The whole batch at once (it is small in this layout), vectorized.
        match act {
            Act::Identity => {}
            Act::Relu => relu_in_place(&mut y[..d.len()]),
            Act::Sigmoid => sigmoid_in_place(&mut y[..d.len()]),
        }
        return;
    }
    // Examples are independent here: the threads take blocks of the batch.
    let sz = d.c * d.s;
    let ys = Disjoint::new(&mut y[..d.len()]);
    let hs = xhat.map(|h| Disjoint::new(&mut h[..d.len()]));
    let p = (mean, mean_lo, inv_std, gamma, beta);
    par_ranges(threads, d.n, min_examples(d), |r| {
        let v = r.start * sz..r.end * sz;
        // SAFETY: the example blocks are disjoint.
        let (yr, hr) = unsafe { (ys.range(v.clone()), hs.as_ref().map(|h| h.range(v.clone()))) };
        match act {
            Act::Identity => normalize_maps(&x[v], Dims { n: r.len(), ..d }, p, yr, hr),
            Act::Relu => normalize_maps_relu(&x[v], Dims { n: r.len(), ..d }, p, yr),
            Act::Sigmoid => normalize_maps_sigmoid(&x[v], Dims { n: r.len(), ..d }, p, yr),
        }
    });
}

type NormParams<'a> = (
    &'a [f32],
    &'a [f32],
    &'a [f32],
    Option<&'a [f32]>,
    Option<&'a [f32]>,
);

crate::simd_kernel! {
    /// `normalize` for the convolutional layout (`s > 1`), one run of positions at a time.
    fn normalize_maps(x: &[f32], d: Dims, p: NormParams<'_>, y: &mut [f32], xhat: Option<&mut [f32]>) {
        let (mean, mean_lo, inv_std, gamma, beta) = p;
        let mut xhat = xhat;
        for i in 0..d.n {
            for ch in 0..d.c {
                let off = (i * d.c + ch) * d.s;
                let (mu, lo, is) = (mean[ch], mean_lo[ch], inv_std[ch]);
                let (g, b) = match (gamma, beta) {
                    (Some(g), Some(b)) => (g[ch], b[ch]),
                    _ => (1.0, 0.0),
                };
                let xr = &x[off..off + d.s];
                let yr = &mut y[off..off + d.s];
                if let Some(h) = xhat.as_deref_mut() {
                    for ((hv, yv), &xv) in h[off..off + d.s].iter_mut().zip(yr).zip(xr) {
                        let t = (xv - mu - lo) * is;
                        *hv = t;
                        *yv = t * g + b;
                    }
                } else {
                    for (yv, &xv) in yr.iter_mut().zip(xr) {
                        *yv = (xv - mu - lo) * is * g + b;
                    }
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// `y = relu(y)`, as `relu_forward`.
    fn relu_in_place(y: &mut [f32]) {
        for v in y.iter_mut() {
            *v = Act::Relu.apply(*v);
        }
    }
}

crate::simd_kernel! {
    /// `y = sigmoid(y)`, as `sigmoid_forward`.
    fn sigmoid_in_place(y: &mut [f32]) {
        for v in y.iter_mut() {
            *v = Act::Sigmoid.apply(*v);
        }
    }
}

/// `normalize_maps` followed by `act` in the same pass (no `xhat` copy: the convolutional
/// layout recomputes it).
#[inline(always)]
fn normalize_maps_act(x: &[f32], d: Dims, p: NormParams<'_>, y: &mut [f32], act: Act) {
    let (mean, mean_lo, inv_std, gamma, beta) = p;
    for i in 0..d.n {
        for ch in 0..d.c {
            let off = (i * d.c + ch) * d.s;
            let (mu, lo, is) = (mean[ch], mean_lo[ch], inv_std[ch]);
            let (g, b) = match (gamma, beta) {
                (Some(g), Some(b)) => (g[ch], b[ch]),
                _ => (1.0, 0.0),
            };
            for (yv, &xv) in y[off..off + d.s].iter_mut().zip(&x[off..off + d.s]) {
                *yv = act.apply((xv - mu - lo) * is * g + b);
            }
        }
    }
}

crate::simd_kernel! {
    /// `normalize_maps` and a ReLU, in one pass.
    fn normalize_maps_relu(x: &[f32], d: Dims, p: NormParams<'_>, y: &mut [f32]) {
        normalize_maps_act(x, d, p, y, Act::Relu)
    }
}

crate::simd_kernel! {
    /// `normalize_maps` and a sigmoid, in one pass.
    fn normalize_maps_sigmoid(x: &[f32], d: Dims, p: NormParams<'_>, y: &mut [f32]) {
        normalize_maps_act(x, d, p, y, Act::Sigmoid)
    }
}

/// What the backward pass knows of `xhat`.
#[derive(Clone, Copy)]
pub enum Xhat<'a> {
    /// Written by the forward pass (the fully connected layout keeps it: it is small).
    Stored(&'a [f32]),
    /// Recomputed from the layer's input and the statistics the forward pass used (the
    /// convolutional layout: saves writing and reading back a copy of every activation).
    FromInput {
        /// The layer's input, `n x c x s`.
        x: &'a [f32],
        /// The mean the forward pass subtracted (high part).
        mean: &'a [f32],
        /// Its low part (`mean + mean_lo` is the mean to twice f32 precision).
        mean_lo: &'a [f32],
    },
}

impl<'a> Xhat<'a> {
    /// The values to compute feature `ch`'s xhat from, as `(v - mu - lo) * is`: the stored
    /// xhat with `(0, 0, 1)` (exact), or the input with the feature's statistics.
    #[inline(always)]
    fn source(&self, ch: usize, inv_std: &[f32]) -> (&'a [f32], (f32, f32, f32)) {
        match *self {
            Xhat::Stored(h) => (h, (0.0, 0.0, 1.0)),
            Xhat::FromInput { x, mean, mean_lo } => (x, (mean[ch], mean_lo[ch], inv_std[ch])),
        }
    }

    fn stored(&self) -> &'a [f32] {
        match *self {
            Xhat::Stored(h) => h,
            Xhat::FromInput { .. } => {
                unreachable!("the fully connected layout keeps xhat from the forward pass")
            }
        }
    }
}

/// Per-feature `sum dy` and `sum dy * xhat` (= dbeta and dgamma), in f64.
#[allow(clippy::too_many_arguments)]
fn grad_sums(
    dy: &[f32],
    xhat: Xhat<'_>,
    inv_std: &[f32],
    d: Dims,
    mask: Option<ReluMask<'_>>,
    sum_dy: &mut [f64],
    sum_dy_xhat: &mut [f64],
    threads: usize,
) {
    sum_dy[..d.c].fill(0.0);
    sum_dy_xhat[..d.c].fill(0.0);
    if d.s == 1 {
        let c = d.c;
        let xhat = xhat.stored();
        for i in 0..d.n {
            let dr = &dy[i * c..][..c];
            let hr = &xhat[i * c..][..c];
            for ch in 0..c {
                let g = match mask {
                    Some(m) => {
                        let (ga, be) = m.affine(ch);
                        pass(hr[ch] * ga + be, dr[ch])
                    }
                    None => dr[ch],
                };
                sum_dy[ch] += g as f64;
                sum_dy_xhat[ch] += (g * hr[ch]) as f64;
            }
        }
        return;
    }
    // Per feature, so the threads take blocks of features.
    let (ds, hs) = (
        Disjoint::new(&mut sum_dy[..d.c]),
        Disjoint::new(&mut sum_dy_xhat[..d.c]),
    );
    par_ranges(threads, d.c, min_features(d), |r| {
        // SAFETY: the feature blocks are disjoint.
        let (a, b) = unsafe { (ds.range(r.clone()), hs.range(r.clone())) };
        grad_sums_features(dy, xhat, inv_std, d, mask, r.start, a, b);
    });
}

/// `grad_sums` (convolutional layout) for the features `c0 .. c0 + sum_dy.len()`.
#[allow(clippy::too_many_arguments)]
fn grad_sums_features(
    dy: &[f32],
    xhat: Xhat<'_>,
    inv_std: &[f32],
    d: Dims,
    mask: Option<ReluMask<'_>>,
    c0: usize,
    sum_dy: &mut [f64],
    sum_dy_xhat: &mut [f64],
) {
    for (j, (a, b)) in sum_dy.iter_mut().zip(sum_dy_xhat).enumerate() {
        let ch = c0 + j;
        let (mut sa, mut sb) = ([0f64; LANES], [0f64; LANES]);
        let (v, stats) = xhat.source(ch, inv_std);
        for i in 0..d.n {
            let off = (i * d.c + ch) * d.s;
            if i + 1 < d.n {
                // The next example's runs (see `stats_features`).
                let next = off + d.c * d.s;
                super::prefetch(&dy[next..next + d.s]);
                super::prefetch(&v[next..next + d.s]);
            }
            let (dyr, vr) = (&dy[off..off + d.s], &v[off..off + d.s]);
            match mask {
                Some(m) => add_dy_dyxhat_relu(dyr, vr, stats, m.affine(ch), &mut sa, &mut sb),
                None => add_dy_dyxhat(dyr, vr, stats, &mut sa, &mut sb),
            }
        }
        *a = reduce(&sa);
        *b = reduce(&sb);
    }
}

/// dgamma = sum dy * xhat and dbeta = sum dy per feature (written when asked), returning the
/// two f64 sums, which live in `acc` (`sum dy` in `acc[..c]`, `sum dy * xhat` in
/// `acc[c..2c]`). The first half of [`backward_train`]: a data-parallel run sums the two over
/// its ranks before [`backward_dx`].
#[allow(clippy::too_many_arguments)]
pub fn param_grads<'a>(
    dy: &[f32],
    xhat: Xhat<'_>,
    inv_std: &[f32],
    d: Dims,
    mask: Option<ReluMask<'_>>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    acc: &'a mut [f64],
    threads: usize,
) -> (&'a mut [f64], &'a mut [f64]) {
    let (sum_dy, sum_dy_xhat) = acc[..2 * d.c].split_at_mut(d.c);
    grad_sums(dy, xhat, inv_std, d, mask, sum_dy, sum_dy_xhat, threads);
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
    xhat: Xhat<'_>,
    inv_std: &[f32],
    gamma: Option<&[f32]>,
    d: Dims,
    mask: Option<ReluMask<'_>>,
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    acc: &mut [f64],
    threads: usize,
) {
    param_grads(dy, xhat, inv_std, d, mask, dgamma, dbeta, acc, threads);
    if let Some(dx) = dx {
        backward_dx(dy, xhat, inv_std, gamma, d, mask, d.m(), dx, acc, threads);
    }
}

/// The second half of [`backward_train`]: dx from the per-feature sums that [`param_grads`]
/// left in `acc`, for statistics over `m` values per feature (`d.m()` in one process; the whole
/// global batch's when the sums were reduced over the ranks of a data-parallel run).
/// Overwrites the sums in `acc`.
#[allow(clippy::too_many_arguments)]
pub fn backward_dx(
    dy: &[f32],
    xhat: Xhat<'_>,
    inv_std: &[f32],
    gamma: Option<&[f32]>,
    d: Dims,
    mask: Option<ReluMask<'_>>,
    m: usize,
    dx: &mut [f32],
    acc: &mut [f64],
    threads: usize,
) {
    let (sum_dy, sum_dy_xhat) = acc[..2 * d.c].split_at_mut(d.c);
    let m = m as f64;
    // dx = k * (dy - a - xhat * b) with k = gamma * inv_std, a = sum_dy / m, b = sum_dy_xhat / m.
    let c = d.c;
    for ch in 0..c {
        sum_dy[ch] /= m;
        sum_dy_xhat[ch] /= m;
    }
    if d.s == 1 {
        let xhat = xhat.stored();
        for i in 0..d.n {
            let dr = &dy[i * c..][..c];
            let hr = &xhat[i * c..][..c];
            let xr = &mut dx[i * c..][..c];
            for ch in 0..c {
                let k = gamma.map_or(1.0, |g| g[ch]) * inv_std[ch];
                let a = sum_dy[ch] as f32;
                let b = sum_dy_xhat[ch] as f32;
                let g = match mask {
                    Some(m) => {
                        let (ga, be) = m.affine(ch);
                        pass(hr[ch] * ga + be, dr[ch])
                    }
                    None => dr[ch],
                };
                xr[ch] = k * (g - a - hr[ch] * b);
            }
        }
        return;
    }
    // Examples are independent here: the threads take blocks of the batch.
    let sz = c * d.s;
    let dxs = Disjoint::new(&mut dx[..d.len()]);
    let sums = (&*sum_dy, &*sum_dy_xhat);
    par_ranges(threads, d.n, min_examples(d), |r| {
        let v = r.start * sz..r.end * sz;
        let xh = match xhat {
            Xhat::Stored(h) => Xhat::Stored(&h[v.clone()]),
            Xhat::FromInput { x, mean, mean_lo } => Xhat::FromInput {
                x: &x[v.clone()],
                mean,
                mean_lo,
            },
        };
        // SAFETY: the example blocks are disjoint.
        let dxr = unsafe { dxs.range(v.clone()) };
        let dn = Dims { n: r.len(), ..d };
        match mask {
            Some(m) => dx_maps_relu(&dy[v], xh, inv_std, gamma, dn, m, sums, dxr),
            None => dx_maps(&dy[v], xh, inv_std, gamma, dn, sums, dxr),
        }
    });
}

/// The fused dx of `backward_train` in the convolutional layout, given the per-feature means
/// of dy and dy * xhat; with a fused ReLU (`mask`), dy where its input was positive.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dx_maps_run(
    dy: &[f32],
    xhat: Xhat<'_>,
    inv_std: &[f32],
    gamma: Option<&[f32]>,
    d: Dims,
    mask: Option<ReluMask<'_>>,
    sums: (&[f64], &[f64]),
    dx: &mut [f32],
) {
    for i in 0..d.n {
        for ch in 0..d.c {
            let k = gamma.map_or(1.0, |g| g[ch]) * inv_std[ch];
            let (a, b) = (sums.0[ch] as f32, sums.1[ch] as f32);
            let (v, (mu, lo, is)) = xhat.source(ch, inv_std);
            let relu = mask.map(|m| m.affine(ch));
            let off = (i * d.c + ch) * d.s;
            for ((o, &g), &xv) in dx[off..off + d.s]
                .iter_mut()
                .zip(&dy[off..off + d.s])
                .zip(&v[off..off + d.s])
            {
                let h = (xv - mu - lo) * is;
                let g = match relu {
                    Some((ga, be)) => pass(h * ga + be, g),
                    None => g,
                };
                *o = k * (g - a - h * b);
            }
        }
    }
}

crate::simd_kernel! {
    /// `dx_maps_run` without an activation.
    fn dx_maps(
        dy: &[f32],
        xhat: Xhat<'_>,
        inv_std: &[f32],
        gamma: Option<&[f32]>,
        d: Dims,
        sums: (&[f64], &[f64]),
        dx: &mut [f32],
    ) {
        dx_maps_run(dy, xhat, inv_std, gamma, d, None, sums, dx)
    }
}

crate::simd_kernel! {
    /// `dx_maps_run` with a fused ReLU.
    fn dx_maps_relu(
        dy: &[f32],
        xhat: Xhat<'_>,
        inv_std: &[f32],
        gamma: Option<&[f32]>,
        d: Dims,
        mask: ReluMask<'_>,
        sums: (&[f64], &[f64]),
        dx: &mut [f32],
    ) {
        dx_maps_run(dy, xhat, inv_std, gamma, d, Some(mask), sums, dx)
    }
}

/// Backward pass in inference mode, where the statistics are constants:
/// `dx = dy * gamma * inv_std`; dgamma and dbeta as in training.
#[allow(clippy::too_many_arguments)]
pub fn backward_eval(
    dy: &[f32],
    xhat: Xhat<'_>,
    inv_std: &[f32],
    gamma: Option<&[f32]>,
    d: Dims,
    mask: Option<ReluMask<'_>>,
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    acc: &mut [f64],
    threads: usize,
) {
    param_grads(dy, xhat, inv_std, d, mask, dgamma, dbeta, acc, threads);
    if let Some(dx) = dx {
        for i in 0..d.n {
            for ch in 0..d.c {
                let k = gamma.map_or(1.0, |g| g[ch]) * inv_std[ch];
                let off = (i * d.c + ch) * d.s;
                let (dxr, dyr) = (&mut dx[off..off + d.s], &dy[off..off + d.s]);
                match mask {
                    Some(m) => {
                        let (v, (mu, lo, is)) = xhat.source(ch, inv_std);
                        let (ga, be) = m.affine(ch);
                        let vr = &v[off..off + d.s];
                        for ((o, &g), &xv) in dxr.iter_mut().zip(dyr).zip(vr) {
                            let h = (xv - mu - lo) * is;
                            *o = pass(h * ga + be, g) * k;
                        }
                    }
                    None => {
                        for (o, &g) in dxr.iter_mut().zip(dyr) {
                            *o = g * k;
                        }
                    }
                }
            }
        }
    }
}

/// How running statistics follow the mini-batch statistics during training.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RunningAverage {
    /// PyTorch's convention: `running = (1 - momentum) * running + momentum * batch`.
    Exponential {
        /// The weight of the new batch, in `[0, 1]` (PyTorch's default 0.1).
        momentum: f32,
    },
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

/// Update running mean and variance after a training step of ghost batch normalization
/// (Hoffer et al. 2017), once per step from all its virtual batches: `means` and `vars` hold
/// each virtual batch's mean and biased variance (`c` per batch, one batch after another) and
/// `counts` its values per statistic. The step's statistics are the count-weighted averages of
/// the batches' means and of their unbiased variances, so that every replica of a data-parallel
/// run (each one virtual batch) can keep the same running statistics. With one batch this is
/// [`update_running`] up to rounding.
pub fn update_running_ghost(
    running_mean: &mut [f32],
    running_var: &mut [f32],
    means: &[f32],
    vars: &[f32],
    counts: &[usize],
    avg: RunningAverage,
    batches_tracked: i64,
) {
    let c = running_mean.len();
    let factor = match avg {
        RunningAverage::Exponential { momentum } => momentum as f64,
        RunningAverage::Cumulative => 1.0 / batches_tracked.max(1) as f64,
    };
    let total: usize = counts.iter().sum();
    for ch in 0..c {
        let (mut mean, mut var) = (0.0f64, 0.0f64);
        for (k, &m) in counts.iter().enumerate() {
            let w = m as f64 / total as f64;
            mean += w * means[k * c + ch] as f64;
            var += w * (m as f64 / (m as f64 - 1.0)) * vars[k * c + ch] as f64;
        }
        let rm = running_mean[ch] as f64;
        let rv = running_var[ch] as f64;
        running_mean[ch] = ((1.0 - factor) * rm + factor * mean) as f32;
        running_var[ch] = ((1.0 - factor) * rv + factor * var) as f32;
    }
}

/// Update running mean and variance from a step's mean and unbiased variance given in f64 (a
/// data-parallel run's average over its ranks), as [`update_running`] does.
pub fn update_running_unbiased(
    running_mean: &mut [f32],
    running_var: &mut [f32],
    mean: &[f64],
    unbiased_var: &[f64],
    avg: RunningAverage,
    batches_tracked: i64,
) {
    let factor = match avg {
        RunningAverage::Exponential { momentum } => momentum as f64,
        RunningAverage::Cumulative => 1.0 / batches_tracked.max(1) as f64,
    };
    for ch in 0..running_mean.len() {
        let rm = running_mean[ch] as f64;
        let rv = running_var[ch] as f64;
        running_mean[ch] = ((1.0 - factor) * rm + factor * mean[ch]) as f32;
        running_var[ch] = ((1.0 - factor) * rv + factor * unbiased_var[ch]) as f32;
    }
}

/// Batch renormalization's correction (Ioffe 2017, Algorithm 1), per feature, against the
/// running statistics in PyTorch's convention: with `sigma_B = sqrt(batch_var + eps)` and
/// `sigma = sqrt(running_var + eps)`, `r = clip(sigma_B / sigma, 1/rmax, rmax)` and
/// `d = clip((mu_B - running_mean) / sigma, -dmax, dmax)`; the renormalized value is
/// `xhat * r + d`. Computed in f64 (the batch mean to its two-f32 precision), rounded once.
/// With `rmax = 1` and `dmax = 0`, `r = 1` and `d = 0` exactly: batch normalization.
#[allow(clippy::too_many_arguments)]
pub fn renorm_factors(
    batch_mean: &[f32],
    batch_mean_lo: &[f32],
    batch_var: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
    rmax: f32,
    dmax: f32,
    r: &mut [f32],
    d: &mut [f32],
) {
    let (rmax, dmax, eps) = (rmax as f64, dmax as f64, eps as f64);
    for ch in 0..r.len() {
        let sigma_b = (batch_var[ch] as f64 + eps).sqrt();
        let sigma = (running_var[ch] as f64 + eps).sqrt();
        let mu_b = batch_mean[ch] as f64 + batch_mean_lo[ch] as f64;
        r[ch] = (sigma_b / sigma).clamp(1.0 / rmax, rmax) as f32;
        d[ch] = ((mu_b - running_mean[ch] as f64) / sigma).clamp(-dmax, dmax) as f32;
    }
}

/// The paper's Algorithm 2, lines 8-11: population statistics as averages over training
/// mini-batches. Feed it each batch's mean and biased variance; `finish` gives
/// `E[x] = E_B[mu_B]` and `Var[x] = m/(m-1) E_B[sigma2_B]`.
#[derive(Clone, Debug, Default)]
pub struct PopulationStats {
    sum_mean: Vec<f64>,
    sum_var: Vec<f64>,
    batches: usize,
    m: usize,
}

impl PopulationStats {
    /// No batches yet, for `c` features.
    pub fn new(c: usize) -> Self {
        PopulationStats {
            sum_mean: vec![0.0; c],
            sum_var: vec![0.0; c],
            batches: 0,
            m: 0,
        }
    }

    /// Add one mini-batch's mean and biased variance (`m` values per statistic).
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

    /// Sum the accumulated statistics over the ranks of a data-parallel run whose ranks each
    /// added their own batches (`sum` adds a buffer element-wise over the ranks).
    pub fn sum_over(&mut self, sum: &dyn Fn(&mut [f64])) {
        let c = self.sum_mean.len();
        let mut buf = Vec::with_capacity(2 * c + 2);
        buf.extend_from_slice(&self.sum_mean);
        buf.extend_from_slice(&self.sum_var);
        buf.push(self.batches as f64);
        // Slices of unequal sizes have m differing by one: the ranks' mean m, rounded down,
        // the same on every rank.
        buf.push(self.m as f64);
        buf.push(1.0);
        sum(&mut buf);
        self.sum_mean.copy_from_slice(&buf[..c]);
        self.sum_var.copy_from_slice(&buf[c..2 * c]);
        self.batches = buf[2 * c] as usize;
        self.m = (buf[2 * c + 1] / buf[2 * c + 2]) as usize;
    }

    /// Mini-batches added so far.
    pub fn batches(&self) -> usize {
        self.batches
    }

    /// Writes `E[x]` and `Var[x]`; false when no batch was seen.
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

    /// Algorithm 1's outputs in f64.
    pub struct Forward {
        /// The normalized, scaled and shifted output, `n x c x s`.
        pub y: Vec<f64>,
        /// The batch mean per feature.
        pub mean: Vec<f64>,
        /// The biased batch variance per feature.
        pub var: Vec<f64>,
    }

    fn idx(d: Dims, i: usize, ch: usize, p: usize) -> usize {
        (i * d.c + ch) * d.s + p
    }

    /// Algorithm 1 term by term: mean, variance, xhat, `y = gamma xhat + beta`.
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
