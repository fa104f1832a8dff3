//! The batch-normalization layer (PyTorch's `BatchNorm1d` for `s = 1`, `BatchNorm2d` for
//! feature maps of `s = H * W` positions). The arithmetic lives in `kernels::batch_norm`; this
//! layer owns gamma and beta, the running statistics, Algorithm 2's population statistics, and
//! the cache for the backward pass (`inv_std`; `xhat` in the fully connected layout, where it
//! is small; feature maps recompute it from the layer's input).

use super::{backward_nothing, check_forward, Ctx, Layer, Mode, TensorMut};
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
    // Per-step workspace and backward cache.
    batch_mean: Vec<f32>,
    batch_mean_lo: Vec<f32>,
    batch_var: Vec<f32>,
    inv_std: Vec<f32>,
    zeros: Vec<f32>,
    xhat: Vec<f32>,
    acc: Vec<f64>,
    last_mode: Mode,
    /// The batch size of the last successful forward pass; 0: none to differentiate.
    last_n: usize,
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
            batch_mean: vec![0.0; c],
            batch_mean_lo: vec![0.0; c],
            batch_var: vec![0.0; c],
            inv_std: vec![0.0; c],
            zeros: vec![0.0; c],
            xhat: Vec::new(),
            acc: vec![0.0; 2 * c],
            last_mode: Mode::Train,
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

    /// The mini-batch mean and biased variance of the last training-mode forward pass.
    pub fn batch_stats(&self) -> (&[f32], &[f32]) {
        (&self.batch_mean, &self.batch_var)
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
    }

    /// End Algorithm 2: fix `E[x]` and `Var[x]`. Returns the number of batches averaged.
    pub fn finish_population(&mut self) -> usize {
        let Some(p) = self.population.take() else {
            return 0;
        };
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

    fn training_stats(&mut self, x: &[f32], n: usize, threads: usize) -> Result<()> {
        if self.s == 1 {
            k::batch_stats_nc(
                x,
                n,
                self.c,
                &mut self.batch_mean,
                &mut self.batch_mean_lo,
                &mut self.batch_var,
                &mut self.acc,
            )?;
        } else {
            let d = self.dims(n);
            k::batch_stats(
                x,
                d,
                &mut self.batch_mean,
                &mut self.batch_mean_lo,
                &mut self.batch_var,
                threads,
            )?;
        }
        k::inv_std(&self.batch_var, self.eps, &mut self.inv_std);
        Ok(())
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
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        check_forward(self, x, y, n)?;
        self.reserve(n);
        let d = self.dims(n);
        self.last_mode = ctx.mode;
        let mean_lo: &[f32] = match ctx.mode {
            Mode::Train | Mode::Population => {
                self.training_stats(x, n, ctx.threads)?;
                &self.batch_mean_lo
            }
            Mode::Eval => {
                let (_, var) = select_inference(
                    self.inference,
                    &self.population_mean,
                    &self.population_var,
                    &self.running_mean,
                    &self.running_var,
                );
                k::inv_std(var, self.eps, &mut self.inv_std);
                &self.zeros
            }
        };
        let mean: &[f32] = match ctx.mode {
            Mode::Train | Mode::Population => &self.batch_mean,
            Mode::Eval => {
                select_inference(
                    self.inference,
                    &self.population_mean,
                    &self.population_var,
                    &self.running_mean,
                    &self.running_var,
                )
                .0
            }
        };
        k::normalize(
            x,
            d,
            mean,
            mean_lo,
            &self.inv_std,
            self.gamma.as_deref(),
            self.beta.as_deref(),
            y,
            // The convolutional layout recomputes xhat from x in the backward pass.
            (self.s == 1).then_some(&mut self.xhat[..]),
            ctx.threads,
        );
        match ctx.mode {
            Mode::Train => {
                self.num_batches_tracked += 1;
                k::update_running(
                    &mut self.running_mean,
                    &mut self.running_var,
                    &self.batch_mean,
                    &self.batch_var,
                    d.m(),
                    self.running_average,
                    self.num_batches_tracked,
                );
            }
            Mode::Population => {
                if let Some(p) = &mut self.population {
                    p.add_batch(&self.batch_mean, &self.batch_var, d.m());
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
        let f = if self.last_mode == Mode::Eval {
            k::backward_eval
        } else {
            k::backward_train
        };
        let xhat = if self.s == 1 {
            k::Xhat::Stored(&self.xhat)
        } else {
            // The statistics the forward pass normalized with.
            let (mean, mean_lo) = match self.last_mode {
                Mode::Eval => (
                    select_inference(
                        self.inference,
                        &self.population_mean,
                        &self.population_var,
                        &self.running_mean,
                        &self.running_var,
                    )
                    .0,
                    &self.zeros[..],
                ),
                Mode::Train | Mode::Population => (&self.batch_mean[..], &self.batch_mean_lo[..]),
            };
            k::Xhat::FromInput { x, mean, mean_lo }
        };
        f(
            dy,
            xhat,
            &self.inv_std,
            self.gamma.as_deref(),
            d,
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

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        format!(
            "BatchNorm{}({}, eps={}{})",
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
