//! Group normalization (Wu & He 2018) and its backward pass; layer normalization is the case of
//! one group.
//!
//! Layout as `batch_norm`: `x` holds `n` examples of `c` channels, each a run of `s` positions
//! (element (i, ch, p) at `(i * c + ch) * s + p`; `s = 1` is the fully connected layout NC,
//! `s = H * W` feature maps NCHW). The `c` channels form `groups` groups of `cg = c / groups`
//! consecutive channels, so that one example's group is one contiguous run of `L = cg * s`
//! values. Per example i and group g, over those L values:
//!
//!   mu      = 1/L sum x                          (mean)
//!   sigma2  = 1/L sum (x - mu)^2                 (biased variance)
//!   xhat    = (x - mu) / sqrt(sigma2 + eps)
//!   y       = gamma_ch * xhat + beta_ch          (per-channel scale and shift)
//!
//! No statistic crosses examples: a batch of one works, and training and inference compute the
//! same function. Backward, with dxhat = dy * gamma_ch and sums over the group's L values:
//!
//!   dx      = 1 / (L sqrt(sigma2 + eps)) * (L dxhat - sum dxhat - xhat sum dxhat xhat)
//!   dgamma_ch = sum over examples and positions of dy xhat,   dbeta_ch = sum of dy.
//!
//! The group sums come from per-channel sums: `sum dxhat = sum_ch gamma_ch sum dy` and
//! `sum dxhat xhat = sum_ch gamma_ch sum dy xhat`, the same per-channel sums that give
//! dgamma and dbeta, so one pass over dy serves both.
//!
//! Statistics are robust in float32 as batch norm's are: two passes with f64 accumulators, and
//! the mean travels as two f32s (`mean + mean_lo`), so `(x - mean) - mean_lo` stays exact when
//! the mean is large against the spread (mean 1e4, standard deviation 1e-2).
//!
//! Threads: examples are independent, so the forward pass splits the batch into one block per
//! thread. The backward pass splits it into the same two halves (`[0, n/2)` and `[n/2, n)`)
//! whatever the thread count: dgamma and dbeta are summed per half in f64 and the halves added
//! in a fixed order, so any thread count gives the same bits.

use super::Disjoint;
use crate::{Error, Result};

/// Shape of a batch for group normalization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Examples in the batch.
    pub n: usize,
    /// Channels (features).
    pub c: usize,
    /// Positions per channel (`H * W`; 1 for the fully connected layout).
    pub s: usize,
    /// Groups of `c / groups` consecutive channels (1: layer norm; `c`: instance norm).
    pub groups: usize,
}

impl Dims {
    /// Channels per group.
    pub fn cg(&self) -> usize {
        self.c / self.groups
    }
    /// Values per statistic, `cg * s`.
    pub fn group_len(&self) -> usize {
        self.cg() * self.s
    }
    /// Values in the batch, `n * c * s`.
    pub fn len(&self) -> usize {
        self.n * self.c * self.s
    }
    /// True for an empty batch.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Statistics in the batch, `n * groups`.
    pub fn stats_len(&self) -> usize {
        self.n * self.groups
    }
    /// `Err` unless `groups` is at least 1 and divides `c`, and `c` and `s` are at least 1.
    pub fn check(&self) -> Result<()> {
        if self.groups == 0 || self.c == 0 || self.s == 0 || !self.c.is_multiple_of(self.groups) {
            return Err(Error::Shape(format!(
                "group norm: {} channels of {} positions cannot form {} groups (the channels must be a positive multiple of the groups)",
                self.c, self.s, self.groups
            )));
        }
        Ok(())
    }
    fn with_n(self, n: usize) -> Dims {
        Dims { n, ..self }
    }
}

/// Lanes of the f64 accumulators: independent sums in a fixed order (as in `batch_norm`).
const LANES: usize = 16;

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

/// `sum v` in f64 over LANES lanes, element `j` into lane `j % LANES`.
#[inline(always)]
fn sum_f64(v: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
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
    reduce(&acc)
}

/// `sum (v - mu)^2` in f64, as `sum_f64`.
#[inline(always)]
fn sum_sq_dev(v: &[f32], mu: f64) -> f64 {
    let mut acc = [0f64; LANES];
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
    reduce(&acc)
}

/// `(sum dy, sum dy * xhat)` in f64 over one channel's run, with
/// `xhat = (x - mu - lo) * is` computed exactly as the forward pass did.
#[inline(always)]
fn sums_dy_dyxhat(dy: &[f32], x: &[f32], mu: f32, lo: f32, is: f32) -> (f64, f64) {
    let (mut sa, mut sb) = ([0f64; LANES], [0f64; LANES]);
    let (cd, cx) = (dy.chunks_exact(LANES), x.chunks_exact(LANES));
    let (td, tx) = (cd.remainder(), cx.remainder());
    for (g, xv) in cd.zip(cx) {
        let g: &[f32; LANES] = g.try_into().expect("chunk of LANES");
        let xv: &[f32; LANES] = xv.try_into().expect("chunk of LANES");
        for j in 0..LANES {
            let h = (xv[j] - mu - lo) * is;
            sa[j] += g[j] as f64;
            sb[j] += g[j] as f64 * h as f64;
        }
    }
    for j in 0..td.len().min(tx.len()) {
        let h = (tx[j] - mu - lo) * is;
        sa[j] += td[j] as f64;
        sb[j] += td[j] as f64 * h as f64;
    }
    (reduce(&sa), reduce(&sb))
}

/// Normalize, scale and shift a batch: per (example, group) mean and biased variance, written
/// to `mean`/`mean_lo`/`inv_std` (`n * groups` each, example-major) for the backward pass, and
/// `y = gamma_ch * xhat + beta_ch` (`gamma`/`beta` `None` without the affine part).
/// `Err` on a bad shape (see [`Dims::check`]); slices shorter than `d` asks for panic.
#[allow(clippy::too_many_arguments)]
pub fn forward(
    x: &[f32],
    d: Dims,
    eps: f32,
    gamma: Option<&[f32]>,
    beta: Option<&[f32]>,
    y: &mut [f32],
    mean: &mut [f32],
    mean_lo: &mut [f32],
    inv_std: &mut [f32],
    threads: usize,
) -> Result<()> {
    d.check()?;
    let affine = match (gamma, beta) {
        (Some(g), Some(b)) => Some((&g[..d.c], &b[..d.c])),
        _ => None,
    };
    // Examples are independent: the threads take blocks of the batch.
    let (sz, gs) = (d.c * d.s, d.groups);
    let ys = Disjoint::new(&mut y[..d.len()]);
    let ms = Disjoint::new(&mut mean[..d.stats_len()]);
    let ls = Disjoint::new(&mut mean_lo[..d.stats_len()]);
    let is = Disjoint::new(&mut inv_std[..d.stats_len()]);
    super::par_ranges(threads, d.n, 1, |r| {
        let (v, g) = (r.start * sz..r.end * sz, r.start * gs..r.end * gs);
        // SAFETY: the example blocks are disjoint.
        let (yr, st) = unsafe {
            (
                ys.range(v.clone()),
                (ms.range(g.clone()), ls.range(g.clone()), is.range(g)),
            )
        };
        forward_examples(&x[v], d.with_n(r.len()), eps, affine, yr, st);
    });
    Ok(())
}

type Affine<'a> = Option<(&'a [f32], &'a [f32])>;
type StatsMut<'a> = (&'a mut [f32], &'a mut [f32], &'a mut [f32]);

crate::simd_kernel! {
    /// `forward` for a block of examples.
    fn forward_examples(x: &[f32], d: Dims, eps: f32, affine: Affine<'_>, y: &mut [f32], stats: StatsMut<'_>) {
        let (mean, mean_lo, inv_std) = stats;
        let (cg, s, len) = (d.cg(), d.s, d.group_len());
        let inv_l = 1.0 / len as f64;
        for i in 0..d.n {
            for g in 0..d.groups {
                let off = (i * d.c + g * cg) * s;
                let xr = &x[off..off + len];
                let mu = sum_f64(xr) * inv_l;
                let var = sum_sq_dev(xr, mu) * inv_l;
                let hi = mu as f32;
                let lo = (mu - hi as f64) as f32;
                let is = (1.0 / (var + eps as f64).sqrt()) as f32;
                let k = i * d.groups + g;
                mean[k] = hi;
                mean_lo[k] = lo;
                inv_std[k] = is;
                for j in 0..cg {
                    let ch = g * cg + j;
                    let (gm, bt) = affine.map_or((1.0, 0.0), |(gm, bt)| (gm[ch], bt[ch]));
                    let r = j * s..(j + 1) * s;
                    for (yv, &xv) in y[off..off + len][r.clone()].iter_mut().zip(&xr[r]) {
                        let h = (xv - hi - lo) * is;
                        *yv = h * gm + bt;
                    }
                }
            }
        }
    }
}

/// The backward pass of [`forward`], closed form (see the module doc), given the statistics the
/// forward pass wrote. Writes `dx` when given, and `dgamma`/`dbeta` (`c` each) when given.
/// `acc` is caller workspace of at least `4 * c` f64.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    dy: &[f32],
    d: Dims,
    gamma: Option<&[f32]>,
    stats: (&[f32], &[f32], &[f32]),
    dx: Option<&mut [f32]>,
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    acc: &mut [f64],
    threads: usize,
) {
    let c = d.c;
    let gamma = gamma.map(|g| &g[..c]);
    let half = d.n / 2;
    let (sz, gs) = (c * d.s, d.groups);
    let (mean, mean_lo, inv_std) = stats;
    let (ma, mb) = mean[..d.stats_len()].split_at(half * gs);
    let (la, lb) = mean_lo[..d.stats_len()].split_at(half * gs);
    let (ia, ib) = inv_std[..d.stats_len()].split_at(half * gs);
    let (xa, xb) = x[..d.len()].split_at(half * sz);
    let (dya, dyb) = dy[..d.len()].split_at(half * sz);
    let (dxa, dxb) = match dx {
        Some(dx) => {
            let (a, b) = dx[..d.len()].split_at_mut(half * sz);
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    // Per half: the channel sums of dy and dy * xhat over its examples.
    let (acc_a, acc_b) = acc[..4 * c].split_at_mut(2 * c);
    let (da, db) = (d.with_n(half), d.with_n(d.n - half));
    super::join(
        threads,
        || backward_examples(xa, dya, da, gamma, (ma, la, ia), dxa, acc_a),
        || backward_examples(xb, dyb, db, gamma, (mb, lb, ib), dxb, acc_b),
    );
    // dbeta = sum dy and dgamma = sum dy xhat: the two halves added in a fixed order.
    let (sdy_a, sdyh_a) = acc_a.split_at(c);
    let (sdy_b, sdyh_b) = acc_b.split_at(c);
    if let Some(dg) = dgamma {
        for ch in 0..c {
            dg[ch] = (sdyh_a[ch] + sdyh_b[ch]) as f32;
        }
    }
    if let Some(dbt) = dbeta {
        for ch in 0..c {
            dbt[ch] = (sdy_a[ch] + sdy_b[ch]) as f32;
        }
    }
}

type Stats<'a> = (&'a [f32], &'a [f32], &'a [f32]);

crate::simd_kernel! {
    /// `backward` for the examples of one half: `acc` (`2 * c`) gets the half's per-channel
    /// `sum dy`, then `sum dy xhat`.
    fn backward_examples(
        x: &[f32],
        dy: &[f32],
        d: Dims,
        gamma: Option<&[f32]>,
        stats: Stats<'_>,
        dx: Option<&mut [f32]>,
        acc: &mut [f64],
    ) {
        let (mean, mean_lo, inv_std) = stats;
        let (c, cg, s, len) = (d.c, d.cg(), d.s, d.group_len());
        let inv_l = 1.0 / len as f64;
        let (sum_dy, sum_dyh) = acc[..2 * c].split_at_mut(c);
        sum_dy.fill(0.0);
        sum_dyh.fill(0.0);
        let mut dx = dx;
        for i in 0..d.n {
            for g in 0..d.groups {
                let k = i * d.groups + g;
                let (mu, lo, is) = (mean[k], mean_lo[k], inv_std[k]);
                let off = (i * c + g * cg) * s;
                // Group sums of dxhat and dxhat * xhat from the per-channel sums.
                let (mut a, mut b) = (0f64, 0f64);
                for j in 0..cg {
                    let ch = g * cg + j;
                    let r = off + j * s..off + (j + 1) * s;
                    let (sa, sb) = sums_dy_dyxhat(&dy[r.clone()], &x[r], mu, lo, is);
                    let gm = gamma.map_or(1.0, |gm| gm[ch] as f64);
                    a += gm * sa;
                    b += gm * sb;
                    sum_dy[ch] += sa;
                    sum_dyh[ch] += sb;
                }
                let Some(dx) = dx.as_deref_mut() else { continue };
                // dx = is * (dxhat - mean(dxhat) - xhat * mean(dxhat xhat)).
                let (a, b) = ((a * inv_l) as f32, (b * inv_l) as f32);
                for j in 0..cg {
                    let ch = g * cg + j;
                    let gm = gamma.map_or(1.0, |gm| gm[ch]);
                    let r = off + j * s..off + (j + 1) * s;
                    for ((o, &gv), &xv) in dx[r.clone()].iter_mut().zip(&dy[r.clone()]).zip(&x[r]) {
                        let h = (xv - mu - lo) * is;
                        *o = is * (gv * gm - a - h * b);
                    }
                }
            }
        }
    }
}

/// The slow, obviously-correct twin in f64: the forward equations and the unfused chain rule,
/// term by term. Used by tests.
pub mod f64ref {
    use super::Dims;

    fn idx(d: Dims, i: usize, ch: usize, p: usize) -> usize {
        (i * d.c + ch) * d.s + p
    }

    /// The forward pass's outputs in f64.
    pub struct Forward {
        /// The output, `n x c x s`.
        pub y: Vec<f64>,
        /// The mean per (example, group), example-major.
        pub mean: Vec<f64>,
        /// The biased variance per (example, group).
        pub var: Vec<f64>,
    }

    /// Mean, variance, xhat and `y = gamma xhat + beta`, per example and group.
    pub fn forward(x: &[f64], d: Dims, gamma: &[f64], beta: &[f64], eps: f64) -> Forward {
        let cg = d.c / d.groups;
        let m = (cg * d.s) as f64;
        let mut y = vec![0.0; d.len()];
        let (mut mean, mut var) = (vec![0.0; d.stats_len()], vec![0.0; d.stats_len()]);
        for i in 0..d.n {
            for g in 0..d.groups {
                let members =
                    || (g * cg..(g + 1) * cg).flat_map(move |ch| (0..d.s).map(move |p| (ch, p)));
                let mu = members().map(|(ch, p)| x[idx(d, i, ch, p)]).sum::<f64>() / m;
                let v = members()
                    .map(|(ch, p)| (x[idx(d, i, ch, p)] - mu).powi(2))
                    .sum::<f64>()
                    / m;
                for (ch, p) in members() {
                    let k = idx(d, i, ch, p);
                    y[k] = gamma[ch] * (x[k] - mu) / (v + eps).sqrt() + beta[ch];
                }
                mean[i * d.groups + g] = mu;
                var[i * d.groups + g] = v;
            }
        }
        Forward { y, mean, var }
    }

    /// Returns (dx, dgamma, dbeta) by the chain rule through the variance and the mean, term
    /// by term (as `batch_norm::reference::backward_train`, per example and group).
    pub fn backward(
        x: &[f64],
        dy: &[f64],
        d: Dims,
        gamma: &[f64],
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let cg = d.c / d.groups;
        let m = (cg * d.s) as f64;
        let f = forward(x, d, gamma, &vec![0.0; d.c], eps);
        let mut dx = vec![0.0; d.len()];
        let mut dgamma = vec![0.0; d.c];
        let mut dbeta = vec![0.0; d.c];
        for i in 0..d.n {
            for g in 0..d.groups {
                let (mu, v) = (f.mean[i * d.groups + g], f.var[i * d.groups + g]);
                let sd = (v + eps).sqrt();
                let members: Vec<(usize, usize)> = (g * cg..(g + 1) * cg)
                    .flat_map(|ch| (0..d.s).map(move |p| (ch, p)))
                    .collect();
                let (mut dvar, mut dmu_a, mut dmu_b) = (0.0, 0.0, 0.0);
                for &(ch, p) in &members {
                    let k = idx(d, i, ch, p);
                    let dxhat = dy[k] * gamma[ch];
                    dvar += dxhat * (x[k] - mu) * -0.5 * (v + eps).powf(-1.5);
                    dmu_a += -dxhat / sd;
                    dmu_b += -2.0 * (x[k] - mu) / m;
                    dgamma[ch] += dy[k] * (x[k] - mu) / sd;
                    dbeta[ch] += dy[k];
                }
                let dmu = dmu_a + dvar * dmu_b;
                for &(ch, p) in &members {
                    let k = idx(d, i, ch, p);
                    let dxhat = dy[k] * gamma[ch];
                    dx[k] = dxhat / sd + dvar * 2.0 * (x[k] - mu) / m + dmu / m;
                }
            }
        }
        (dx, dgamma, dbeta)
    }
}
