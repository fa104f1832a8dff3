//! The batch-normalization layer (PyTorch's `BatchNorm1d` for `s = 1`, `BatchNorm2d` for
//! feature maps of `s = H * W` positions). The arithmetic lives in `kernels::batch_norm`; this
//! layer owns gamma and beta, the running statistics, Algorithm 2's population statistics, and
//! the cache for the backward pass (`inv_std`; `xhat` in the fully connected layout, where it
//! is small; feature maps recompute it from the layer's input).

use super::{backward_nothing, check_forward, Ctx, Layer, Mode, TensorMut};
use crate::dist::{BnSync, Dist};
use crate::kernels::activation;
use crate::kernels::batch_norm::{self as k, Dims, PopulationStats, RunningAverage};
use crate::Result;

/// Which statistics normalize at inference.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InferenceStats {
    /// The running averages kept during training (PyTorch's convention).
    Running,
    /// The paper's Algorithm 2: averages over training mini-batches after training.
    Population,
}

/// Batch normalization of `c` features, each over the batch and its `s` positions: input and
/// output `n x (c * s)` (NC for `s = 1`, NCHW feature maps for `s = H * W`).
///
/// Works without `reserve` (the cache is sized by the first forward pass of a larger batch).
/// `backward` before any forward pass, or with another batch size than the last forward's,
/// sets the gradients of gamma and beta to zero and `dx` to zeros.
pub struct BatchNorm {
    /// Feature maps (or features).
    pub c: usize,
    /// Positions per feature map (1 for fully connected layers).
    pub s: usize,
    /// Added to the variance before the square root (PyTorch's default 1e-5).
    pub eps: f32,
    /// How the running statistics follow the batches (PyTorch's momentum 0.1, or a cumulative
    /// average).
    pub running_average: RunningAverage,
    /// The scale, one per feature; `None` without the affine transform (`affine=False`).
    pub gamma: Option<Vec<f32>>,
    /// The shift, one per feature; `None` without the affine transform.
    pub beta: Option<Vec<f32>>,
    grad_gamma: Vec<f32>,
    grad_beta: Vec<f32>,
    /// The running mean, one per feature (PyTorch's `running_mean`).
    pub running_mean: Vec<f32>,
    /// The running unbiased variance, one per feature (PyTorch's `running_var`).
    pub running_var: Vec<f32>,
    /// Training-mode forward passes so far (PyTorch's `num_batches_tracked`).
    pub num_batches_tracked: i64,
    /// Which statistics `Mode::Eval` normalizes with.
    pub inference: InferenceStats,
    /// Algorithm 2's `E[x]`, one per feature, once computed.
    pub population_mean: Option<Vec<f32>>,
    /// Algorithm 2's `Var[x]` (unbiased), one per feature, once computed.
    pub population_var: Option<Vec<f32>>,
    population: Option<PopulationStats>,
    /// Ghost batch normalization (Hoffer et al. 2017): in training, statistics over virtual
    /// batches of this many examples (the last one may be smaller), one after another inside
    /// the mini-batch. `None`: the whole mini-batch.
    pub ghost: Option<usize>,
    /// Batch renormalization (Ioffe 2017): the final clipping limits of r and d, `None` for
    /// plain batch normalization (set with `set_renorm`).
    renorm: Option<Renorm>,
    /// The limits in force now (a schedule relaxes them towards `renorm` over training).
    renorm_now: Renorm,
    /// Frozen BN: training-mode passes normalize with the inference statistics, which stay
    /// fixed (fine-tuning); gamma and beta still learn.
    pub frozen: bool,
    /// A data-parallel run's ranks (set with `Network::set_dist`): with `BnSync::Global` the
    /// batch statistics and the backward pass's two sums are reduced over them; with either
    /// mode the running statistics (and Algorithm 2's) are averaged over them.
    sync: Option<Dist>,
    /// The reductions' buffer, `3 * c`.
    sync_buf: Vec<f64>,
    /// The last batch-statistics pass merged its statistics over the ranks (`BnSync::Global`
    /// on a rank's slice of a global batch): its backward pass reduces too.
    last_merged: bool,
    /// Algorithm 2's passes added each rank's own virtual batches (local sync, or ghost
    /// batches): `finish_population` sums them over the ranks.
    population_summed: bool,
    /// The activation fused into this layer (`fuse_activation`): `forward` writes
    /// `act(y)`, and `backward` takes the gradient at the activation's output.
    act: k::Act,
    /// The gradient at BN's own output, for the backward passes that do not apply a fused
    /// activation's derivative inline (see `backward`).
    gact: Vec<f32>,
    // Per-step workspace and backward cache: statistics per virtual batch, one after another.
    batch_mean: Vec<f32>,
    batch_mean_lo: Vec<f32>,
    batch_var: Vec<f32>,
    inv_std: Vec<f32>,
    zeros: Vec<f32>,
    xhat: Vec<f32>,
    acc: Vec<f64>,
    /// Batch renormalization's r and d per virtual batch, and the effective scale and shift
    /// `gamma * r`, `beta + gamma * d` they give.
    r: Vec<f32>,
    d: Vec<f32>,
    gamma_eff: Vec<f32>,
    beta_eff: Vec<f32>,
    /// Per virtual batch gradients of gamma and beta before they are summed.
    part_dgamma: Vec<f32>,
    part_dbeta: Vec<f32>,
    /// Values per statistic of each virtual batch of the last forward pass.
    counts: Vec<usize>,
    last_mode: Mode,
    /// The last forward pass normalized with batch statistics (else inference statistics).
    last_batch_stats: bool,
    /// The batch size of the last successful forward pass; 0: none to differentiate.
    last_n: usize,
}

/// Batch renormalization's limits: r is clipped to `[1/rmax, rmax]` and d to `[-dmax, dmax]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Renorm {
    /// At least 1 (1: r = 1).
    pub rmax: f32,
    /// At least 0 (0: d = 0).
    pub dmax: f32,
}

impl Renorm {
    /// `rmax = 1`, `dmax = 0`: r = 1 and d = 0, i.e. batch normalization.
    pub const NONE: Renorm = Renorm {
        rmax: 1.0,
        dmax: 0.0,
    };
}

/// How batch renormalization's limits relax over a run (Ioffe 2017, section 4: rmax = 1 and
/// dmax = 0 for the first 5,000 steps, then rmax rises linearly to 3 by 40k steps and dmax to 5
/// by 25k). Ours is in fractions of the run's length, so that it scales with the run: the
/// default keeps the paper's milestones on a 50,000-step run (0.1, 0.8, 0.5).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RenormSchedule {
    /// Until this fraction of the run, r = 1 and d = 0 (batch normalization).
    pub warmup: f64,
    /// rmax reaches its final value at this fraction.
    pub r_end: f64,
    /// dmax reaches its final value at this fraction.
    pub d_end: f64,
}

impl Default for RenormSchedule {
    fn default() -> Self {
        RenormSchedule {
            warmup: 0.1,
            r_end: 0.8,
            d_end: 0.5,
        }
    }
}

impl RenormSchedule {
    /// Parse `WARMUP,R_END,D_END` (fractions of the run, `0 <= WARMUP <= R_END, D_END <= 1`).
    pub fn parse(s: &str) -> Result<RenormSchedule> {
        let bad = || {
            crate::Error::config(
                "--renorm-schedule",
                format!(
                    "'{s}' (expected WARMUP,R_END,D_END: fractions of the run with \
                     0 <= WARMUP <= R_END <= 1 and WARMUP <= D_END <= 1, e.g. 0.1,0.8,0.5)"
                ),
            )
        };
        let v: Vec<f64> = s
            .split(',')
            .map(|p| p.trim().parse::<f64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad())?;
        let [warmup, r_end, d_end] = v[..] else {
            return Err(bad());
        };
        let ok = |a: f64, b: f64| a.is_finite() && b.is_finite() && 0.0 <= a && a <= b && b <= 1.0;
        if !ok(warmup, r_end) || !ok(warmup, d_end) {
            return Err(bad());
        }
        Ok(RenormSchedule {
            warmup,
            r_end,
            d_end,
        })
    }

    /// The limits at step `step` (0-based) of a run of `steps`, relaxing towards `end`.
    pub fn limits(&self, end: Renorm, step: usize, steps: usize) -> Renorm {
        let t = step as f64 / steps.max(1) as f64;
        let ramp = |until: f64| {
            if t <= self.warmup {
                0.0
            } else if t >= until {
                1.0
            } else {
                (t - self.warmup) / (until - self.warmup)
            }
        };
        Renorm {
            rmax: (1.0 + (end.rmax as f64 - 1.0) * ramp(self.r_end)) as f32,
            dmax: (end.dmax as f64 * ramp(self.d_end)) as f32,
        }
    }
}

impl BatchNorm {
    /// `c` features of `s` positions each (`s = 1`: `BatchNorm1d(c)`; `s = H * W`:
    /// `BatchNorm2d(c)` on `H x W` maps), with gamma and beta if `affine`. gamma = 1, beta = 0,
    /// running mean 0 and variance 1, as PyTorch initializes them.
    pub fn new(c: usize, s: usize, eps: f32, affine: bool) -> Self {
        BatchNorm {
            c,
            s,
            eps,
            running_average: RunningAverage::Exponential { momentum: 0.1 },
            gamma: affine.then(|| vec![1.0; c]),
            beta: affine.then(|| vec![0.0; c]),
            grad_gamma: vec![0.0; c],
            grad_beta: vec![0.0; c],
            running_mean: vec![0.0; c],
            running_var: vec![1.0; c],
            num_batches_tracked: 0,
            inference: InferenceStats::Running,
            population_mean: None,
            population_var: None,
            population: None,
            ghost: None,
            renorm: None,
            renorm_now: Renorm::NONE,
            frozen: false,
            sync: None,
            sync_buf: Vec::new(),
            last_merged: false,
            population_summed: false,
            act: k::Act::Identity,
            gact: Vec::new(),
            batch_mean: vec![0.0; c],
            batch_mean_lo: vec![0.0; c],
            batch_var: vec![0.0; c],
            inv_std: vec![0.0; c],
            zeros: vec![0.0; c],
            xhat: Vec::new(),
            acc: vec![0.0; 2 * c],
            r: Vec::new(),
            d: Vec::new(),
            gamma_eff: Vec::new(),
            beta_eff: Vec::new(),
            part_dgamma: vec![0.0; c],
            part_dbeta: vec![0.0; c],
            counts: Vec::with_capacity(1),
            last_mode: Mode::Train,
            last_batch_stats: false,
            last_n: 0,
        }
    }

    /// The gradient of gamma from the last backward pass, one per feature; `None` without the
    /// affine transform.
    pub fn grad_gamma(&self) -> Option<&[f32]> {
        self.gamma.as_ref().map(|_| &self.grad_gamma[..])
    }

    /// The gradient of beta from the last backward pass, one per feature; `None` without the
    /// affine transform.
    pub fn grad_beta(&self) -> Option<&[f32]> {
        self.beta.as_ref().map(|_| &self.grad_beta[..])
    }

    /// The mini-batch mean and biased variance of the last training-mode forward pass (with
    /// ghost batches: `c` per virtual batch, one after another).
    pub fn batch_stats(&self) -> (&[f32], &[f32]) {
        let len = self.c * self.counts.len().max(1);
        (&self.batch_mean[..len], &self.batch_var[..len])
    }

    /// Make this layer batch renormalization with final limits `limits` (`None`: batch
    /// normalization). The limits in force start at the final ones; a training run relaxes
    /// them with `set_renorm_limits` on its schedule.
    pub fn set_renorm(&mut self, limits: Option<Renorm>) {
        self.renorm = limits;
        self.renorm_now = limits.unwrap_or(Renorm::NONE);
    }

    /// Batch renormalization's final limits, `None` for batch normalization.
    pub fn renorm(&self) -> Option<Renorm> {
        self.renorm
    }

    /// Set the limits in force for the next training passes (no effect without renorm).
    pub fn set_renorm_limits(&mut self, limits: Renorm) {
        self.renorm_now = limits;
    }

    /// The limits in force now.
    pub fn renorm_limits(&self) -> Renorm {
        self.renorm_now
    }

    /// Join a data-parallel run (`None`: leave it). Batch renormalization with global sync
    /// computes r and d from the global batch's statistics; ghost batches are the global
    /// batch's, each rank normalizing its own (see [`BatchNorm::check_split`]).
    pub fn set_sync(&mut self, sync: Option<Dist>) -> Result<()> {
        self.sync_buf = vec![0.0; if sync.is_some() { 3 * self.c } else { 0 }];
        self.sync = sync;
        Ok(())
    }

    /// The sync of a run of more than one rank.
    fn synced(&self) -> Option<&Dist> {
        self.sync.as_ref().filter(|d| d.comm.size() > 1)
    }

    /// `BnSync::Global` over more than one rank: replace the statistics of the (single)
    /// batch in slots `0..c` by those of the global batch, merged with Chan's formula from
    /// every rank's (count, mean, M2); `counts[0]` becomes the global count.
    fn merge_global_stats(&mut self) {
        let Some(dist) = self.synced().cloned() else {
            return;
        };
        let c = self.c;
        let m = self.counts[0] as f64;
        let buf = &mut self.sync_buf[..3 * c];
        for ch in 0..c {
            buf[3 * ch] = m;
            buf[3 * ch + 1] = self.batch_mean[ch] as f64 + self.batch_mean_lo[ch] as f64;
            buf[3 * ch + 2] = self.batch_var[ch] as f64 * m;
        }
        dist.comm.merge_moments(buf);
        for ch in 0..c {
            let mu = buf[3 * ch + 1];
            self.batch_mean[ch] = mu as f32;
            self.batch_mean_lo[ch] = (mu - self.batch_mean[ch] as f64) as f32;
            self.batch_var[ch] = (buf[3 * ch + 2] / buf[3 * ch]) as f32;
        }
        self.counts[0] = buf[0] as usize;
        k::inv_std(&self.batch_var[..c], self.eps, &mut self.inv_std[..c]);
    }

    /// Ghost batches in a data-parallel run: the virtual batches are those of the global
    /// batch of `batch` examples split over `p` ranks, so every rank's slice must start on a
    /// virtual batch's boundary (each rank then normalizes its own virtual batches, and no
    /// statistics cross the ranks). Ok without ghost batches, or when the whole batch is one
    /// virtual batch (plain BN, synchronized as `--bn-sync` says).
    pub fn check_split(&self, batch: usize, p: usize) -> Result<()> {
        let Some(g) = self.ghost.filter(|_| self.virtual_batches(batch) > 1) else {
            return Ok(());
        };
        if (0..p).all(|r| crate::dist::slice_of(batch, p, r).start.is_multiple_of(g)) {
            return Ok(());
        }
        let sizes: Vec<String> = (0..p)
            .map(|r| crate::dist::slice_of(batch, p, r).len().to_string())
            .collect();
        Err(crate::Error::config(
            "--norm",
            format!(
                "ghost:{g} with batches of {batch} over {p} processes: the processes' slices \
                 ({} examples) do not start on ghost-batch boundaries, so a ghost batch would \
                 straddle two processes; use a batch whose every process's slice is a multiple \
                 of {g} (e.g. {}), or run without mpirun",
                sizes.join(", "),
                g * p
            ),
        ))
    }

    /// Each rank normalized its own virtual batches (`BnSync::Local`'s slice, or ghost
    /// batches): the running statistics follow the count-weighted average over every rank's
    /// virtual batches of their means and unbiased variances (as ghost BN's do in one
    /// process), the same on every rank.
    fn update_running_local(&mut self, dist: &Dist) {
        let c = self.c;
        let buf = &mut self.sync_buf[..3 * c];
        buf[..2 * c + 1].fill(0.0);
        let mut m = 0.0;
        for (k, &mk) in self.counts.iter().enumerate() {
            let mk = mk as f64;
            let unbias = mk / (mk - 1.0);
            for ch in 0..c {
                buf[ch] += mk * self.batch_mean[k * c + ch] as f64;
                buf[c + ch] += mk * unbias * self.batch_var[k * c + ch] as f64;
            }
            m += mk;
        }
        buf[2 * c] = m;
        dist.comm.sum_f64(&mut buf[..2 * c + 1]);
        let total = buf[2 * c];
        for v in buf[..2 * c].iter_mut() {
            *v /= total;
        }
        let (mean, var) = buf[..2 * c].split_at(c);
        k::update_running_unbiased(
            &mut self.running_mean,
            &mut self.running_var,
            mean,
            var,
            self.running_average,
            self.num_batches_tracked,
        );
    }

    /// The number of virtual batches a training-mode batch of `n` examples is split into.
    pub fn virtual_batches(&self, n: usize) -> usize {
        match self.ghost {
            Some(g) if g > 0 && g < n => n.div_ceil(g),
            _ => 1,
        }
    }

    /// The mean and variance that inference normalizes with: Algorithm 2's population
    /// statistics when `inference` asks for them and they have been computed, else the running
    /// averages. Folding and export read them here so that they match `Mode::Eval` exactly.
    pub fn inference_stats(&self) -> (&[f32], &[f32]) {
        select_inference(
            self.inference,
            &self.population_mean,
            &self.population_var,
            &self.running_mean,
            &self.running_var,
        )
    }

    /// Start Algorithm 2: the following `Mode::Population` passes accumulate batch statistics.
    pub fn begin_population(&mut self) {
        self.population = Some(PopulationStats::new(self.c));
        self.population_summed = false;
    }

    /// Drop an Algorithm 2 pass before its end (a stop request): no population statistics,
    /// nothing accumulated left behind. Local to this process (no collective).
    pub fn abandon_population(&mut self) {
        self.population = None;
        self.population_summed = false;
        self.population_mean = None;
        self.population_var = None;
    }

    /// End Algorithm 2: fix `E[x]` and `Var[x]`. Returns the number of batches averaged.
    pub fn finish_population(&mut self) -> usize {
        let Some(mut p) = self.population.take() else {
            return 0;
        };
        if let Some(d) = self.synced() {
            // Merged (global sync): every rank added the same statistics. Local sync, or ghost
            // batches: each rank its own virtual batches'.
            if self.population_summed {
                p.sum_over(&|buf| d.comm.sum_f64(buf));
            }
        }
        let mut mean = vec![0.0; self.c];
        let mut var = vec![0.0; self.c];
        if p.finish(&mut mean, &mut var) {
            self.population_mean = Some(mean);
            self.population_var = Some(var);
        }
        p.batches()
    }

    fn dims(&self, n: usize) -> Dims {
        Dims {
            n,
            c: self.c,
            s: self.s,
        }
    }

    /// Statistics of the virtual batch `k` (examples `a..a + nk`) into its slots.
    fn training_stats(
        &mut self,
        x: &[f32],
        k: usize,
        a: usize,
        nk: usize,
        threads: usize,
    ) -> Result<()> {
        let (c, s) = (self.c, self.s);
        let st = k * c..(k + 1) * c;
        let xs = &x[a * c * s..(a + nk) * c * s];
        if s == 1 {
            k::batch_stats_nc(
                xs,
                nk,
                c,
                &mut self.batch_mean[st.clone()],
                &mut self.batch_mean_lo[st.clone()],
                &mut self.batch_var[st.clone()],
                &mut self.acc,
            )?;
        } else {
            let d = self.dims(nk);
            k::batch_stats(
                xs,
                d,
                &mut self.batch_mean[st.clone()],
                &mut self.batch_mean_lo[st.clone()],
                &mut self.batch_var[st.clone()],
                threads,
            )?;
        }
        k::inv_std(&self.batch_var[st.clone()], self.eps, &mut self.inv_std[st]);
        Ok(())
    }

    /// Size the per-virtual-batch buffers for `chunks` virtual batches.
    fn size_chunks(&mut self, chunks: usize) {
        let len = chunks * self.c;
        for v in [
            &mut self.batch_mean,
            &mut self.batch_mean_lo,
            &mut self.batch_var,
            &mut self.inv_std,
        ] {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        }
        if self.renorm.is_some() {
            for v in [
                &mut self.r,
                &mut self.d,
                &mut self.gamma_eff,
                &mut self.beta_eff,
            ] {
                if v.len() < len {
                    v.resize(len, 0.0);
                }
            }
        }
        if self.counts.capacity() < chunks {
            self.counts.reserve(chunks - self.counts.len());
        }
    }

    /// Batch renormalization of virtual batch `k`: r and d against the running statistics,
    /// and the effective scale and shift.
    fn renorm_factors(&mut self, k: usize, limits: Renorm) {
        let c = self.c;
        let st = k * c..(k + 1) * c;
        k::renorm_factors(
            &self.batch_mean[st.clone()],
            &self.batch_mean_lo[st.clone()],
            &self.batch_var[st.clone()],
            &self.running_mean,
            &self.running_var,
            self.eps,
            limits.rmax,
            limits.dmax,
            &mut self.r[st.clone()],
            &mut self.d[st.clone()],
        );
        for ch in 0..c {
            let (r, d) = (self.r[k * c + ch] as f64, self.d[k * c + ch] as f64);
            let g = self.gamma.as_ref().map_or(1.0, |g| g[ch] as f64);
            let b = self.beta.as_ref().map_or(0.0, |b| b[ch] as f64);
            self.gamma_eff[k * c + ch] = (g * r) as f32;
            self.beta_eff[k * c + ch] = (b + g * d) as f32;
        }
    }

    /// BN's backward pass from the gradient `dy` at its own output, or, with `relu`, at the
    /// output of its fused ReLU (whose derivative is then applied inline).
    fn backward_bn(
        &mut self,
        ctx: Ctx,
        x: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
        relu: bool,
    ) {
        let mask = relu.then_some(k::ReluMask {
            gamma: self.gamma.as_deref(),
            beta: self.beta.as_deref(),
        });
        let (c, s) = (self.c, self.s);
        let dims = self.dims(n);
        let affine = self.gamma.is_some();
        let merged = self.last_merged && self.last_batch_stats;
        if !self.last_batch_stats || (self.counts.len() == 1 && (self.renorm.is_none() || merged)) {
            // One batch of statistics: the inference statistics (Eval mode, or frozen BN in
            // training: constants) or the mini-batch's (plain batch normalization, or batch
            // renormalization over the ranks' merged batch). The gradients go straight to
            // their place.
            let global = self.synced().filter(|_| merged).cloned();
            let (dg, db) = if affine {
                (
                    Some(&mut self.grad_gamma[..]),
                    Some(&mut self.grad_beta[..]),
                )
            } else {
                (None, None)
            };
            let xhat = if s == 1 {
                k::Xhat::Stored(&self.xhat)
            } else if self.last_batch_stats {
                k::Xhat::FromInput {
                    x,
                    mean: &self.batch_mean[..c],
                    mean_lo: &self.batch_mean_lo[..c],
                }
            } else {
                let mean = select_inference(
                    self.inference,
                    &self.population_mean,
                    &self.population_var,
                    &self.running_mean,
                    &self.running_var,
                )
                .0;
                k::Xhat::FromInput {
                    x,
                    mean,
                    mean_lo: &self.zeros,
                }
            };
            if let Some(d) = global {
                // The local sums, summed over the ranks in f64, then dx from the global
                // batch's sums and count.
                k::param_grads(
                    dy,
                    xhat,
                    &self.inv_std[..c],
                    dims,
                    mask,
                    None,
                    None,
                    &mut self.acc,
                    ctx.threads,
                );
                d.comm.sum_f64(&mut self.acc[..2 * c]);
                // dgamma and dbeta are these global sums, rounded once as one process rounds
                // them: rank 0 writes them, the others zeros, so the f32 gradient all-reduce
                // adds exact zeros. (Summing per-rank f32 partials instead loses the digits
                // that cancel between the ranks: sum dy is small against its parts.)
                let lead = d.comm.rank() == 0;
                let (sum_dy, sum_dy_xhat) = self.acc[..2 * c].split_at(c);
                // Batch renormalization: r and d (the same on every rank, from the merged
                // statistics) are constants, dgamma = r sum(dy xhat) + d sum(dy), and dx is
                // batch norm's with the scale gamma * r.
                let renorm = self.renorm.map(|_| (&self.r[..c], &self.d[..c]));
                if let Some(out) = dg {
                    for (ch, o) in out.iter_mut().enumerate() {
                        let v = match renorm {
                            Some((r, d)) => {
                                r[ch] as f64 * sum_dy_xhat[ch] + d[ch] as f64 * sum_dy[ch]
                            }
                            None => sum_dy_xhat[ch],
                        };
                        *o = if lead { v as f32 } else { 0.0 };
                    }
                }
                if let Some(out) = db {
                    for (o, &v) in out.iter_mut().zip(sum_dy) {
                        *o = if lead { v as f32 } else { 0.0 };
                    }
                }
                let gamma = match self.renorm {
                    Some(_) => Some(&self.gamma_eff[..c]),
                    None => self.gamma.as_deref(),
                };
                if let Some(dx) = dx {
                    k::backward_dx(
                        dy,
                        xhat,
                        &self.inv_std[..c],
                        gamma,
                        dims,
                        mask,
                        self.counts[0],
                        dx,
                        &mut self.acc,
                        ctx.threads,
                    );
                }
                return;
            }
            let f = if self.last_batch_stats {
                k::backward_train
            } else {
                k::backward_eval
            };
            f(
                dy,
                xhat,
                &self.inv_std[..c],
                self.gamma.as_deref(),
                dims,
                mask,
                dx,
                dg,
                db,
                &mut self.acc,
                ctx.threads,
            );
            return;
        }
        let chunks = self.counts.len();
        // Virtual batches and/or batch renormalization: each virtual batch is a batch norm of
        // its own. With renormalization, r and d are constants: the layer is batch norm with
        // scale gamma * r (which gives dx), and dgamma = r * sum(dy * xhat) + d * sum(dy).
        let mut dx = dx;
        let mut a = 0;
        for k in 0..chunks {
            let nk = self.counts[k] / s;
            let st = k * c..(k + 1) * c;
            let span = a * c * s..(a + nk) * c * s;
            let xhat = if s == 1 {
                k::Xhat::Stored(&self.xhat[span.clone()])
            } else {
                k::Xhat::FromInput {
                    x: &x[span.clone()],
                    mean: &self.batch_mean[st.clone()],
                    mean_lo: &self.batch_mean_lo[st.clone()],
                }
            };
            let gamma = match self.renorm {
                Some(_) => Some(&self.gamma_eff[st.clone()]),
                None => self.gamma.as_deref(),
            };
            k::backward_train(
                &dy[span.clone()],
                xhat,
                &self.inv_std[st.clone()],
                gamma,
                self.dims(nk),
                None,
                dx.as_deref_mut().map(|d| &mut d[span]),
                Some(&mut self.part_dgamma),
                Some(&mut self.part_dbeta),
                &mut self.acc,
                ctx.threads,
            );
            if affine {
                for ch in 0..c {
                    let (sum_dy_xhat, sum_dy) = (self.part_dgamma[ch], self.part_dbeta[ch]);
                    let dgamma = match self.renorm {
                        Some(_) => {
                            (self.r[k * c + ch] as f64 * sum_dy_xhat as f64
                                + self.d[k * c + ch] as f64 * sum_dy as f64)
                                as f32
                        }
                        None => sum_dy_xhat,
                    };
                    if k == 0 {
                        self.grad_gamma[ch] = dgamma;
                        self.grad_beta[ch] = sum_dy;
                    } else {
                        self.grad_gamma[ch] += dgamma;
                        self.grad_beta[ch] += sum_dy;
                    }
                }
            }
            a += nk;
        }
    }
}

/// The one place that decides which statistics inference uses (see `inference_stats`); a free
/// function so that `forward` can borrow the chosen slices next to its mutable workspace.
fn select_inference<'a>(
    which: InferenceStats,
    population_mean: &'a Option<Vec<f32>>,
    population_var: &'a Option<Vec<f32>>,
    running_mean: &'a [f32],
    running_var: &'a [f32],
) -> (&'a [f32], &'a [f32]) {
    match (which, population_mean, population_var) {
        (InferenceStats::Population, Some(m), Some(v)) => (m, v),
        _ => (running_mean, running_var),
    }
}

impl Layer for BatchNorm {
    fn in_size(&self) -> usize {
        self.c * self.s
    }
    fn out_size(&self) -> usize {
        self.c * self.s
    }
    fn reserve(&mut self, max_batch: usize) {
        let len = max_batch * self.c;
        if self.s == 1 && self.xhat.len() < len {
            self.xhat.resize(len, 0.0);
        }
        self.size_chunks(self.virtual_batches(max_batch));
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        self.last_merged = false;
        check_forward(self, x, y, n)?;
        self.reserve(n);
        self.last_mode = ctx.mode;
        let batch_stats = match ctx.mode {
            Mode::Train => !self.frozen,
            Mode::Population => true,
            Mode::Eval => false,
        };
        self.last_batch_stats = batch_stats;
        if !batch_stats {
            let (mean, var) = select_inference(
                self.inference,
                &self.population_mean,
                &self.population_var,
                &self.running_mean,
                &self.running_var,
            );
            k::inv_std(var, self.eps, &mut self.inv_std[..self.c]);
            k::normalize(
                x,
                self.dims(n),
                mean,
                &self.zeros,
                &self.inv_std[..self.c],
                self.gamma.as_deref(),
                self.beta.as_deref(),
                y,
                (self.s == 1).then_some(&mut self.xhat[..]),
                self.act,
                ctx.threads,
            );
            self.last_n = n;
            return Ok(());
        }
        let (c, s) = (self.c, self.s);
        // A data-parallel pass over this rank's slice of a global batch: the statistics are
        // merged over the ranks (global sync of one batch), or each rank normalizes its own
        // virtual batches (local sync: the slice; ghost BN: the global batch's ghost batches
        // in this slice) and only the running statistics are reduced.
        let mut merge = false;
        let mut own = None;
        if let Some((d, (batch, _))) = self.synced().and_then(|d| Some((d, d.pass(n)?))) {
            self.check_split(batch, d.comm.size())?;
            merge = d.bn_sync == BnSync::Global && self.virtual_batches(batch) == 1;
            own = (!merge).then(|| d.clone());
        }
        let chunks = self.virtual_batches(n);
        let g = match self.ghost {
            Some(g) if chunks > 1 => g,
            _ => n,
        };
        self.counts.clear();
        for k in 0..chunks {
            let a = k * g;
            let nk = g.min(n - a);
            self.training_stats(x, k, a, nk, ctx.threads)?;
            self.counts.push(nk * s);
        }
        if merge {
            self.merge_global_stats();
        }
        self.last_merged = merge;
        for k in 0..chunks {
            let a = k * g;
            let nk = g.min(n - a);
            let st = k * c..(k + 1) * c;
            let (gamma, beta) = match self.renorm {
                Some(_) => {
                    self.renorm_factors(k, self.renorm_now);
                    (
                        Some(&self.gamma_eff[st.clone()]),
                        Some(&self.beta_eff[st.clone()]),
                    )
                }
                None => (self.gamma.as_deref(), self.beta.as_deref()),
            };
            let span = a * c * s..(a + nk) * c * s;
            k::normalize(
                &x[span.clone()],
                self.dims(nk),
                &self.batch_mean[st.clone()],
                &self.batch_mean_lo[st.clone()],
                &self.inv_std[st],
                gamma,
                beta,
                &mut y[span.clone()],
                // The convolutional layout recomputes xhat from x in the backward pass.
                if s == 1 {
                    Some(&mut self.xhat[span])
                } else {
                    None
                },
                self.act,
                ctx.threads,
            );
        }
        match ctx.mode {
            Mode::Train => {
                self.num_batches_tracked += 1;
                if let Some(d) = own {
                    self.update_running_local(&d);
                } else if chunks == 1 {
                    k::update_running(
                        &mut self.running_mean,
                        &mut self.running_var,
                        &self.batch_mean[..c],
                        &self.batch_var[..c],
                        self.counts[0],
                        self.running_average,
                        self.num_batches_tracked,
                    );
                } else {
                    k::update_running_ghost(
                        &mut self.running_mean,
                        &mut self.running_var,
                        &self.batch_mean,
                        &self.batch_var,
                        &self.counts,
                        self.running_average,
                        self.num_batches_tracked,
                    );
                }
            }
            Mode::Population => {
                if let Some(p) = &mut self.population {
                    self.population_summed |= own.is_some();
                    for (k, &m) in self.counts.iter().enumerate() {
                        p.add_batch(
                            &self.batch_mean[k * c..(k + 1) * c],
                            &self.batch_var[k * c..(k + 1) * c],
                            m,
                        );
                    }
                }
            }
            Mode::Eval => {}
        }
        self.last_n = n;
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
        if n != self.last_n || n == 0 {
            return backward_nothing(self, dx, n);
        }
        let one_batch = !self.last_batch_stats || (self.counts.len() == 1 && self.renorm.is_none());
        match self.act {
            k::Act::Identity => self.backward_bn(ctx, x, dy, dx, n, false),
            // The ReLU's derivative inline, from the recomputed pre-activation.
            k::Act::Relu if one_batch => self.backward_bn(ctx, x, dy, dx, n, true),
            act => {
                // The activation's backward pass as its own layer computes it, into a
                // buffer, then BN's.
                let len = n * self.c * self.s;
                let mut g = std::mem::take(&mut self.gact);
                if g.len() < len {
                    g.resize(len, 0.0);
                }
                let (yv, dyv) = (&y[..len], &dy[..len]);
                let gs = crate::kernels::Disjoint::new(&mut g[..len]);
                crate::kernels::par_ranges(ctx.threads, len, 1 << 15, |r| {
                    // SAFETY: the ranges are disjoint.
                    let gr = unsafe { gs.range(r.clone()) };
                    let (yr, dyr) = (&yv[r.clone()], &dyv[r]);
                    match act {
                        k::Act::Sigmoid => activation::sigmoid_backward(yr, dyr, gr),
                        _ => activation::relu_backward(yr, dyr, gr),
                    }
                });
                self.backward_bn(ctx, x, &g[..len], dx, n, false);
                self.gact = g;
            }
        }
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
        let c = [self.c];
        if let Some(g) = &mut self.gamma {
            f(&format!("{prefix}weight"), &c, TensorMut::F32(g));
        }
        if let Some(b) = &mut self.beta {
            f(&format!("{prefix}bias"), &c, TensorMut::F32(b));
        }
        f(
            &format!("{prefix}running_mean"),
            &c,
            TensorMut::F32(&mut self.running_mean),
        );
        f(
            &format!("{prefix}running_var"),
            &c,
            TensorMut::F32(&mut self.running_var),
        );
        f(
            &format!("{prefix}num_batches_tracked"),
            &[],
            TensorMut::I64(&mut self.num_batches_tracked),
        );
    }

    fn for_each_batch_norm(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        f(self)
    }

    /// `forward` writes `act(gamma * xhat + beta)` in one pass and `backward` takes the
    /// activation's output and gradient: bit for bit the two layers. The container skips the
    /// activation layer (`Sequential::fuse`).
    fn fuse_activation(&mut self, act: k::Act) -> bool {
        self.act = act;
        self.last_n = 0;
        true
    }

    fn fused_activation(&self) -> k::Act {
        self.act
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        let mut extra = String::new();
        if let Some(g) = self.ghost {
            extra += &format!(", ghost={g}");
        }
        if let Some(r) = self.renorm {
            extra += &format!(", renorm(rmax={}, dmax={})", r.rmax, r.dmax);
        }
        if self.frozen {
            extra += ", frozen";
        }
        format!(
            "BatchNorm{}({}, eps={}{}{extra})",
            if self.s == 1 { "1d" } else { "2d" },
            self.c,
            self.eps,
            if self.gamma.is_some() {
                ""
            } else {
                ", affine=False"
            }
        )
    }
}
