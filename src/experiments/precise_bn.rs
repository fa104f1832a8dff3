//! The statistics BN uses at inference (`bnlab reproduce precise-bn`): Wu & Johnson 2021,
//! "Rethinking 'Batch' in BatchNorm", section 3 (arXiv 2105.07576).
//!
//! Inference normalizes with statistics gathered in training. PyTorch keeps an exponential
//! moving average (EMA) of the mini-batch statistics; the paper's "PreciseBN" (Ioffe &
//! Szegedy's Algorithm 2) recomputes the population statistics of the current weights from a
//! few thousand training examples. Wu & Johnson find EMA evaluation unstable early in training
//! and at high learning rates (the EMA averages statistics of weights that have since moved),
//! and PreciseBN stable; and that about 10^3 to 10^4 samples give near-optimal accuracy.
//!
//! The study trains `vgg-mini-bn` on Fashion-MNIST at a normal and at a high learning rate.
//! Every `eval_every` steps it evaluates the test set three ways: the network's own running
//! statistics (EMA, momentum 0.1), a second EMA of momentum 0.01 ([`EmaStats`], kept beside
//! the network from the same mini-batch statistics, so one run serves both: running statistics
//! do not affect training), and population statistics of the current weights over the first
//! `population_examples` training examples. After the last step it computes population
//! statistics from N random training examples for N from 16 to 16,384 (several draws each)
//! and from the whole training set, and evaluates each.
//!
//! The runs go through `study::Study` like every `reproduce`: checkpoints (with the second
//! EMA's buffers and the curve so far), `--resume`, `--report-only`. In a data-parallel study
//! (`Study::with_dist`, global BN sync) the runs go one after the other on every rank, and
//! every Algorithm 2 pass takes each rank's slice of its batches.

use crate::data::{Dataset, Split};
use crate::dist::{BnSync, Dist};
use crate::kernels::batch_norm::{update_running, RunningAverage};
use crate::model;
use crate::network::Network;
use crate::nn::{InferenceStats, Mode};
use crate::optim::Schedule;
use crate::study::{Study, Tracked};
use crate::train::{
    population_statistics, Evaluator, LossSince, Observer, Order, TrainConfig, Trainer,
};
use crate::{Error, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Settings of the study; `default()` is the full run, `quick()` the whole path in a minute
/// or two.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct PreciseBnSetup {
    /// The BN network.
    pub model: String,
    /// The learning rates, normal first, then high (one run each).
    pub lrs: Vec<f64>,
    /// SGD momentum.
    pub momentum: f32,
    /// The learning rate's factor over the whole run (exponential decay).
    pub lr_decay_over_run: f64,
    /// L2 weight decay on every parameter. Without it, BN's scale invariance lets the weights'
    /// norms grow, which lowers the effective learning rate: a high rate then damps itself
    /// (see the README). The paper's recipes use weight decay.
    #[serde(default)]
    pub weight_decay: f32,
    /// Examples per training mini-batch (and per batch of Algorithm 2).
    pub batch_size: usize,
    /// Training steps of each run.
    pub steps: usize,
    /// Evaluate (and checkpoint) every this many steps.
    pub eval_every: usize,
    /// The BN momentum of the network's own running statistics (PyTorch's default 0.1).
    pub ema_momentum: f32,
    /// The momentum of the second EMA, kept beside the network.
    pub slow_ema_momentum: f32,
    /// Training examples (the first ones, in file order) of the population statistics at
    /// every evaluation.
    pub population_examples: usize,
    /// Test images evaluated (the first ones; all 10,000 if larger).
    pub test_examples: usize,
    /// After training: the sample counts N of the population statistics.
    pub sample_counts: Vec<usize>,
    /// Random draws of N training examples per sample count.
    pub draws: usize,
    /// Seed of initialization, batch order and draws.
    pub seed: u64,
    /// Runs trained at once.
    pub workers: usize,
    /// Examples per inference batch.
    pub eval_batch: usize,
}

impl Default for PreciseBnSetup {
    fn default() -> Self {
        PreciseBnSetup {
            model: "vgg-mini-bn".into(),
            lrs: vec![0.05, 1.0],
            momentum: 0.9,
            lr_decay_over_run: 0.1,
            weight_decay: 5e-4,
            batch_size: 32,
            steps: 12_000,
            eval_every: 300,
            ema_momentum: 0.1,
            slow_ema_momentum: 0.01,
            population_examples: 10_000,
            test_examples: 10_000,
            sample_counts: vec![16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
            draws: 5,
            seed: 1,
            workers: 2,
            eval_batch: 500,
        }
    }
}

impl PreciseBnSetup {
    /// The whole path in a minute or two: 600 steps, 2,000 test images, fewer draws.
    pub fn quick() -> Self {
        PreciseBnSetup {
            steps: 600,
            eval_every: 50,
            population_examples: 2_000,
            test_examples: 2_000,
            sample_counts: vec![16, 64, 256, 1024, 4096],
            draws: 2,
            ..Self::default()
        }
    }

    /// Refuse settings that cannot run, naming the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, why: String| Err(Error::config(what, why));
        if self.lrs.is_empty() || self.lrs.iter().any(|l| !l.is_finite() || *l <= 0.0) {
            return bad("learning rates", "need at least one, each > 0".into());
        }
        if self.batch_size < 2 {
            return bad("batch size", "BN needs at least 2 examples".into());
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return bad(
                "--weight-decay",
                format!("{} (must be >= 0)", self.weight_decay),
            );
        }
        if self.steps == 0 || self.eval_every == 0 {
            return bad("--steps / --eval-every", "must be positive".into());
        }
        for m in [self.ema_momentum, self.slow_ema_momentum] {
            if !(m > 0.0 && m <= 1.0) {
                return bad("EMA momentum", format!("{m} (must be in (0, 1])"));
            }
        }
        if self.population_examples < self.batch_size {
            return bad(
                "population examples",
                format!(
                    "{} is less than one batch of {}",
                    self.population_examples, self.batch_size
                ),
            );
        }
        if self.sample_counts.iter().any(|&n| n < 2) || self.draws == 0 {
            return bad(
                "sample counts",
                "each at least 2, and at least one draw".into(),
            );
        }
        if self.workers == 0 || self.eval_batch == 0 || self.test_examples == 0 {
            return bad("workers / eval batch / test examples", "at least 1".into());
        }
        Ok(())
    }

    /// One run per learning rate, in `lrs` order.
    pub fn jobs(&self) -> Vec<Job> {
        self.lrs
            .iter()
            .enumerate()
            .map(|(i, &lr)| Job {
                name: if i == 0 { "normal" } else { "high" }.to_string(),
                lr,
            })
            .collect()
    }
}

/// One training run.
#[derive(Clone, Debug)]
pub struct Job {
    /// `normal` or `high`.
    pub name: String,
    /// Its learning rate at step 0.
    pub lr: f64,
}

impl Job {
    /// The run's key (file names, progress): `lr-0.05`.
    pub fn key(&self) -> String {
        format!("lr-{}", self.lr)
    }
}

/// One evaluation during training: test accuracy (fractions) with each kind of statistics.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EvalPoint {
    /// Steps done.
    pub step: usize,
    /// Mean training loss since the previous evaluation.
    pub train_loss: f64,
    /// The network's running statistics (EMA of momentum `ema_momentum`).
    pub ema: f64,
    /// The second EMA (momentum `slow_ema_momentum`).
    pub ema_slow: f64,
    /// Population statistics of the current weights (`population_examples` examples).
    pub population: f64,
}

/// The accuracies with population statistics from N random training examples.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplePoint {
    /// N.
    pub examples: usize,
    /// Test accuracy of each draw.
    pub accuracies: Vec<f64>,
}

/// What a run left.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    /// The learning rate at step 0.
    pub lr: f64,
    /// Evaluations every `eval_every` steps.
    pub curve: Vec<EvalPoint>,
    /// The step at which training stopped on a NaN or infinite loss or weight.
    pub diverged_at: Option<usize>,
    /// Final weights: population statistics of the whole training set.
    pub population_full: Option<f64>,
    /// Final weights: population statistics from N random examples.
    pub samples: Vec<SamplePoint>,
    /// Wall-clock seconds of this run in the invocation that finished it (kept out of
    /// results.json).
    pub seconds: f64,
}

/// A second set of running statistics with another momentum, updated from each BN layer's
/// mini-batch statistics after every training step exactly as the layer updates its own
/// (`kernels::batch_norm::update_running`): the buffers equal those of the same network
/// trained with that BN momentum, and training is unchanged. Allocation-free per step.
pub struct EmaStats {
    average: RunningAverage,
    mean: Vec<Vec<f32>>,
    var: Vec<Vec<f32>>,
}

impl EmaStats {
    /// Buffers for every BatchNorm of `net` (mean 0, variance 1, as PyTorch starts them).
    /// Ghost batch normalization (several statistics per step) is refused.
    pub fn new(net: &mut Network, momentum: f32) -> Result<Self> {
        let (mut mean, mut var, mut ghost) = (Vec::new(), Vec::new(), false);
        net.for_each_batch_norm(&mut |bn| {
            mean.push(vec![0.0; bn.c]);
            var.push(vec![1.0; bn.c]);
            ghost |= bn.ghost.is_some();
        });
        if ghost {
            return Err(Error::config(
                "EMA statistics",
                "a second EMA of ghost batch normalization is not supported",
            ));
        }
        Ok(EmaStats {
            average: RunningAverage::Exponential { momentum },
            mean,
            var,
        })
    }

    /// Fold in the mini-batch statistics of the training step just taken (a batch of `batch`
    /// examples). Call after every step, before any other forward pass.
    pub fn update(&mut self, net: &mut Network, batch: usize) {
        let mut i = 0;
        let (means, vars, avg) = (&mut self.mean, &mut self.var, self.average);
        net.for_each_batch_norm(&mut |bn| {
            let (bm, bv) = bn.batch_stats();
            if let (Some(m), Some(v)) = (means.get_mut(i), vars.get_mut(i)) {
                update_running(
                    m,
                    v,
                    &bm[..bn.c],
                    &bv[..bn.c],
                    batch * bn.s,
                    avg,
                    bn.num_batches_tracked,
                );
            }
            i += 1;
        });
    }

    /// Exchange these buffers with the network's running statistics (twice to undo).
    pub fn swap(&mut self, net: &mut Network) {
        let mut i = 0;
        let (means, vars) = (&mut self.mean, &mut self.var);
        net.for_each_batch_norm(&mut |bn| {
            if let (Some(m), Some(v)) = (means.get_mut(i), vars.get_mut(i)) {
                std::mem::swap(&mut bn.running_mean, m);
                std::mem::swap(&mut bn.running_var, v);
            }
            i += 1;
        });
    }

    /// The running means, one vector per BatchNorm in the network's order.
    pub fn means(&self) -> &[Vec<f32>] {
        &self.mean
    }

    /// The running (unbiased) variances, one vector per BatchNorm.
    pub fn vars(&self) -> &[Vec<f32>] {
        &self.var
    }

    fn bits(v: &[Vec<f32>]) -> Vec<Vec<u32>> {
        v.iter()
            .map(|l| l.iter().map(|x| x.to_bits()).collect())
            .collect()
    }

    fn from_bits(dst: &mut [Vec<f32>], src: &[Vec<u32>]) {
        for (d, s) in dst.iter_mut().zip(src) {
            for (x, b) in d.iter_mut().zip(s) {
                *x = f32::from_bits(*b);
            }
        }
    }
}

/// The three evaluations of one point of the curve. Leaves the network evaluating with its
/// running statistics, as training found it.
fn evaluate_three(
    net: &mut Network,
    ema: &mut EmaStats,
    setup: &PreciseBnSetup,
    data: &Split,
    evaluator: &mut Evaluator,
) -> Result<(f64, f64, f64)> {
    let limit = Some(setup.test_examples);
    let running = evaluator.evaluate(net, &data.test, None, limit)?.accuracy();
    ema.swap(net);
    let slow = evaluator.evaluate(net, &data.test, None, limit);
    ema.swap(net);
    let slow = slow?.accuracy();
    population_statistics(
        net,
        &data.train,
        setup.batch_size,
        Some(setup.population_examples / setup.batch_size),
    )?;
    let population = evaluator.evaluate(net, &data.test, None, limit);
    clear_population(net);
    Ok((running, slow, population?.accuracy()))
}

/// Back to the running statistics, with no population statistics left behind.
fn clear_population(net: &mut Network) {
    net.set_inference_stats(InferenceStats::Running);
    net.for_each_batch_norm(&mut |bn| {
        bn.population_mean = None;
        bn.population_var = None;
    });
}

/// Algorithm 2 over the training examples `indices`, in mini-batches of `batch` (a tail
/// shorter than a batch is left out, as Algorithm 2 averages equal batches); leaves the
/// network using them for inference. `stop` is asked before each mini-batch (on every rank
/// alike, so it may be a collective): when it answers true, the pass is dropped
/// (`abandon_population`) and ends with `Error::Stopped { step: 0 }`.
pub fn population_of(
    net: &mut Network,
    train: &Dataset,
    indices: &[usize],
    batch: usize,
    stop: &mut dyn FnMut() -> bool,
) -> Result<()> {
    let batch = batch.min(indices.len()).min(net.max_batch());
    if batch < 2 {
        return Err(Error::config(
            "population statistics",
            "Algorithm 2 needs mini-batches of at least 2 examples",
        ));
    }
    let features = train.features();
    let mut x = vec![0.0; batch * features];
    let mut y = vec![0; batch];
    // A data-parallel run: each rank its slice of every batch, as `population_statistics`
    // (the BN layers merge the statistics over the ranks).
    let slice = net.dist().map_or(0..batch, |d| d.slice(batch));
    net.for_each_batch_norm(&mut |bn| bn.begin_population());
    for chunk in indices.chunks_exact(batch) {
        if stop() {
            crate::train::abandon_population(net);
            return Err(Error::Stopped { step: 0 });
        }
        train.fill_batch(&chunk[slice.clone()], &mut x, &mut y);
        net.forward_of(&x, slice.len(), batch, Mode::Population)?;
    }
    net.for_each_batch_norm(&mut |bn| {
        bn.finish_population();
    });
    net.set_inference_stats(InferenceStats::Population);
    Ok(())
}

/// `n` distinct training example indices out of `len`, the `draw`-th draw for `n`.
fn draw_indices(seed: u64, len: usize, n: usize, draw: usize) -> Vec<usize> {
    let mut rng =
        ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_0000_0000 ^ ((n as u64) << 16) ^ draw as u64);
    rand::seq::index::sample(&mut rng, len, n.min(len)).into_vec()
}

/// What a run reports to the command's progress display.
pub struct Progress<'a> {
    /// The worker (0-based) running it.
    pub worker: usize,
    /// The run's key.
    pub label: &'a str,
    /// Steps done.
    pub step: usize,
    /// Steps in the run.
    pub steps: usize,
    /// The latest accuracy with population statistics.
    pub accuracy: Option<f64>,
    /// An evaluation just happened.
    pub evaluated: bool,
    /// The run has ended.
    pub finished: bool,
}

/// The observer of a run: the second EMA after every step, the three evaluations.
struct Follow<'a, P: Fn(usize, Option<f64>, bool)> {
    setup: &'a PreciseBnSetup,
    data: &'a Split,
    ema: EmaStats,
    evaluator: Evaluator,
    curve: Vec<EvalPoint>,
    progress: P,
}

impl<P: Fn(usize, Option<f64>, bool)> Follow<'_, P> {
    fn last(&self) -> Option<f64> {
        self.curve.last().map(|p| p.population)
    }
}

impl<P: Fn(usize, Option<f64>, bool)> Observer for Follow<'_, P> {
    fn evaluate(&mut self, net: &mut Network, step: usize, mean_loss: f64) -> Result<()> {
        // This step's statistics, before the evaluations' forward passes replace them.
        self.ema.update(net, self.setup.batch_size);
        let (ema, ema_slow, population) = evaluate_three(
            net,
            &mut self.ema,
            self.setup,
            self.data,
            &mut self.evaluator,
        )?;
        self.curve.push(EvalPoint {
            step,
            train_loss: mean_loss,
            ema,
            ema_slow,
            population,
        });
        (self.progress)(step, Some(population), true);
        Ok(())
    }

    fn after_step(
        &mut self,
        net: &mut Network,
        trainer: &Trainer,
        _loss: f64,
        _since: &LossSince,
        evaluated: bool,
    ) -> Result<()> {
        if !evaluated {
            self.ema.update(net, self.setup.batch_size);
            if trainer.step.is_multiple_of(25) {
                (self.progress)(trainer.step, self.last(), false);
            }
        }
        Ok(())
    }
}

/// What a run's checkpoint keeps of the observer: the curve and the second EMA (as f32 bits,
/// so that it comes back exactly).
#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    curve: Vec<EvalPoint>,
    mean: Vec<Vec<u32>>,
    var: Vec<Vec<u32>>,
}

impl<P: Fn(usize, Option<f64>, bool)> Tracked for Follow<'_, P> {
    type Saved = Saved;
    fn save(&self) -> Saved {
        Saved {
            curve: self.curve.clone(),
            mean: EmaStats::bits(&self.ema.mean),
            var: EmaStats::bits(&self.ema.var),
        }
    }
    fn restore(&mut self, saved: Saved) {
        self.curve = saved.curve;
        EmaStats::from_bits(&mut self.ema.mean, &saved.mean);
        EmaStats::from_bits(&mut self.ema.var, &saved.var);
    }
}

/// Train and measure one run (continued from its checkpoint, if any); a stop request ends it
/// with `Error::Stopped` after its current step, or within the measurements after training
/// (before any mini-batch of Algorithm 2's passes), which a resume redoes from the checkpoint
/// of the last step.
pub fn run_job(
    setup: &PreciseBnSetup,
    job: &Job,
    data: &Split,
    study: &Study,
    worker: usize,
    on_progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<RunResult> {
    let t0 = Instant::now();
    let key = job.key();
    let progress = |step: usize, accuracy: Option<f64>, evaluated: bool| {
        on_progress(Progress {
            worker,
            label: &key,
            step,
            steps: setup.steps,
            accuracy,
            evaluated,
            finished: false,
        })
    };
    let spec = model::preset(&setup.model)?;
    let shape = data.train.shape();
    let input = model::resolve_input(&spec, Some(&shape))?;
    let threads = crate::study::share_cores(setup.workers, setup.jobs().len()).1;
    let mut net = Network::build(
        &spec,
        &input,
        setup.seed,
        setup.batch_size.max(setup.eval_batch),
        threads,
    )?;
    net.for_each_batch_norm(&mut |bn| {
        bn.running_average = RunningAverage::Exponential {
            momentum: setup.ema_momentum,
        }
    });
    let config = TrainConfig {
        steps: setup.steps,
        batch_size: setup.batch_size,
        lr: job.lr,
        momentum: setup.momentum,
        weight_decay: setup.weight_decay,
        schedule: Schedule::Exponential {
            every: setup.steps,
            gamma: setup.lr_decay_over_run,
        },
        seed: setup.seed,
        order: Order::Shuffle,
        eval_every: setup.eval_every,
        threads,
        augment: crate::train::Augment::None,
        bn: Default::default(),
    };
    config.validate(net.has_batch_norm())?;
    config.validate_for_data(data.train.len())?;
    if let Some(d) = study.dist() {
        join(&mut net, setup, d)?;
    }
    let features = data.train.features();
    let mut trainer = Trainer::new(config, data.train.len(), features);
    let mut follow = Follow {
        setup,
        data,
        ema: EmaStats::new(&mut net, setup.slow_ema_momentum)?,
        evaluator: Evaluator::new(setup.eval_batch, features),
        curve: Vec::new(),
        progress,
    };
    let mut loss = study
        .resume_run(&key, &mut net, &mut trainer, &mut follow)?
        .unwrap_or_default();
    (follow.progress)(trainer.step, follow.last(), false);
    let diverged_at = match study.train_run(
        &key,
        &mut net,
        &mut trainer,
        &data.train,
        setup.steps,
        setup.eval_every,
        setup.eval_every,
        &mut loss,
        &mut follow,
    ) {
        Ok(()) => None,
        Err(Error::Diverged { step, .. }) => Some(step),
        Err(e) => return Err(e),
    };
    let curve = std::mem::take(&mut follow.curve);
    let mut samples = Vec::new();
    let mut population_full = None;
    if diverged_at.is_none() {
        let limit = Some(setup.test_examples);
        let mut evaluator = Evaluator::new(setup.eval_batch, features);
        let all: Vec<usize> = (0..data.train.len()).collect();
        // A stop during the measurements (the whole training set's pass is long) ends the
        // run; the resume redoes them from the checkpoint of the last step.
        let stopped = |e: Error| match e {
            Error::Stopped { .. } => Error::Stopped { step: setup.steps },
            e => e,
        };
        population_of(&mut net, &data.train, &all, setup.batch_size, &mut || {
            study.agree_stop()
        })
        .map_err(stopped)?;
        population_full = Some(
            evaluator
                .evaluate(&mut net, &data.test, None, limit)?
                .accuracy(),
        );
        for &n in &setup.sample_counts {
            let mut accuracies = Vec::with_capacity(setup.draws);
            for d in 0..setup.draws {
                if study.agree_stop() {
                    return Err(Error::Stopped { step: setup.steps });
                }
                let idx = draw_indices(setup.seed, data.train.len(), n, d);
                population_of(&mut net, &data.train, &idx, setup.batch_size, &mut || {
                    study.agree_stop()
                })
                .map_err(stopped)?;
                accuracies.push(
                    evaluator
                        .evaluate(&mut net, &data.test, None, limit)?
                        .accuracy(),
                );
            }
            samples.push(SamplePoint {
                examples: n,
                accuracies,
            });
        }
        clear_population(&mut net);
    }
    on_progress(Progress {
        worker,
        label: &key,
        step: diverged_at.unwrap_or(setup.steps),
        steps: setup.steps,
        accuracy: population_full,
        evaluated: false,
        finished: true,
    });
    Ok(RunResult {
        lr: job.lr,
        curve,
        diverged_at,
        population_full,
        samples,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// Make `net` a replica of the data-parallel run `d`, refusing what that run cannot measure:
/// local BN sync (the second EMA follows the global batch's statistics, which each rank must
/// hold alike) and batches or Algorithm 2 samples too small to split.
fn join(net: &mut Network, setup: &PreciseBnSetup, d: &Dist) -> Result<()> {
    let p = d.comm.size();
    let bad = |why: String| {
        Err(Error::config(
            "reproduce precise-bn",
            format!("{why}; run the study without mpirun"),
        ))
    };
    if d.bn_sync != BnSync::Global {
        return bad(format!(
            "--bn-sync {} on {p} processes: the second EMA needs global sync",
            d.bn_sync.name()
        ));
    }
    let smallest = setup
        .sample_counts
        .iter()
        .map(|&n| n.min(setup.batch_size))
        .chain([setup.batch_size])
        .min()
        .unwrap_or(setup.batch_size);
    if smallest < 2 * p {
        return bad(format!(
            "batches of {smallest} over {p} processes: BN needs at least 2 examples per process"
        ));
    }
    net.set_dist(Some(d.clone()))
}

/// Check, before anything is trained or written, that the study's runs can train and measure
/// as replicas of the data-parallel run `d` ([`run_study`] with `Study::with_dist`).
pub fn check_data_parallel(setup: &PreciseBnSetup, d: &Dist) -> Result<()> {
    setup.validate()?;
    let spec = model::preset(&setup.model)?;
    let input = model::resolve_input(&spec, Some(&[1, 28, 28]))?;
    let mut net = Network::build(&spec, &input, setup.seed, setup.batch_size, 1)?;
    join(&mut net, setup, d)?;
    net.set_dist(None)
}

/// Every run of the study, in `setup.jobs()` order, on `setup.workers` threads; finished runs
/// are read back from `study`, started ones continue from their checkpoints. A stop request
/// ends the runs in training after their current step and returns `Error::Stopped`.
/// `on_done(job, result, resumed)` after each run.
pub fn run_study(
    setup: &PreciseBnSetup,
    data: &Split,
    study: &Study,
    on_progress: &(dyn Fn(Progress<'_>) + Sync),
    on_done: &(dyn Fn(&Job, &RunResult, bool) + Sync),
) -> Result<Vec<RunResult>> {
    setup.validate()?;
    let jobs = setup.jobs();
    let mut results: Vec<Option<RunResult>> = vec![None; jobs.len()];
    for (i, job) in jobs.iter().enumerate() {
        if let Some(r) = study.result::<RunResult>(&job.key())? {
            on_done(job, &r, true);
            results[i] = Some(r);
        }
    }
    let todo: Vec<usize> = (0..jobs.len()).filter(|&i| results[i].is_none()).collect();
    if study.dist().is_some() {
        // Data-parallel: one run at a time on this thread (the one that calls MPI), every
        // rank the same run, the stop agreed before each.
        for &i in &todo {
            if study.agree_stop() {
                return Err(Error::Stopped { step: 0 });
            }
            let job = &jobs[i];
            let r = run_job(setup, job, data, study, 0, on_progress)?;
            study.finish(&job.key(), &r)?;
            on_done(job, &r, false);
            results[i] = Some(r);
        }
        return Ok(results.into_iter().flatten().collect());
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Mutex<Vec<Option<Result<RunResult>>>> =
        Mutex::new((0..jobs.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for worker in 0..crate::study::share_cores(setup.workers, todo.len()).0 {
            let (next, failed, slots, todo, jobs) = (&next, &failed, &slots, &todo, &jobs);
            s.spawn(move || loop {
                if failed.load(Ordering::Relaxed) || study.stop().requested() {
                    break;
                }
                let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let job = &jobs[i];
                let r = run_job(setup, job, data, study, worker, on_progress)
                    .and_then(|r| study.finish(&job.key(), &r).map(|()| r));
                match &r {
                    Ok(res) => on_done(job, res, false),
                    Err(_) => failed.store(true, Ordering::Relaxed),
                }
                if let Ok(mut v) = slots.lock() {
                    v[i] = Some(r);
                }
            });
        }
    });
    let slots = slots
        .into_inner()
        .map_err(|_| Error::config("reproduce precise-bn", "a training thread panicked"))?;
    let mut stopped = None;
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Some(Ok(r)) => results[i] = Some(r),
            Some(Err(Error::Stopped { step })) => stopped = Some(step),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if results.iter().any(Option::is_none) {
        if study.stop().requested() || stopped.is_some() {
            return Err(Error::Stopped {
                step: stopped.unwrap_or(0),
            });
        }
        return Err(Error::config(
            "reproduce precise-bn",
            "a training run did not report",
        ));
    }
    Ok(results.into_iter().flatten().collect())
}

/// The runs already finished, in `setup.jobs()` order; `None` for the others (`--report-only`).
pub fn finished_results(setup: &PreciseBnSetup, study: &Study) -> Result<Vec<Option<RunResult>>> {
    setup
        .jobs()
        .iter()
        .map(|j| study.result(&j.key()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Pixels;
    use crate::train::train_loop;

    /// Noise plus a bright column at the label's position: learnable in a few steps.
    fn synthetic(n: usize, salt: usize) -> Dataset {
        let labels: Vec<u8> = (0..n).map(|i| ((i * 7 + salt) % 10) as u8).collect();
        let pixels: Vec<f32> = (0..n * 144)
            .map(|i| {
                let noise = ((i * 7919 + salt) % 251) as f32 / 251.0;
                let column = (i % 12) as u8 == labels[i / 144];
                noise + if column { 2.0 } else { 0.0 }
            })
            .collect();
        Dataset::new(Pixels::F32(pixels), labels, [1, 12, 12], 10).unwrap()
    }

    /// The study's observer, in the training loop with its evaluations in between: at every
    /// evaluation the second EMA's accuracy is that of a network trained with BN momentum
    /// 0.01 (its own running statistics), the EMA's and the population's those of the network
    /// trained alongside, so the evaluations disturb neither the EMA nor training.
    #[test]
    fn the_curve_matches_a_network_trained_with_the_slow_momentum() {
        let data = Split {
            train: synthetic(320, 0),
            test: synthetic(100, 3),
        };
        let setup = PreciseBnSetup {
            steps: 30,
            eval_every: 10,
            batch_size: 16,
            population_examples: 64,
            test_examples: 100,
            eval_batch: 50,
            ..PreciseBnSetup::default()
        };
        let config = TrainConfig {
            steps: setup.steps,
            batch_size: 16,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            seed: 2,
            order: Order::Shuffle,
            eval_every: 10,
            threads: 1,
            augment: crate::train::Augment::None,
            bn: Default::default(),
        };
        let spec = model::preset("vgg-mini-bn").unwrap();
        let input = model::resolve_input(&spec, Some(&[1, 12, 12])).unwrap();
        let build = |momentum: f32| {
            let mut net = Network::build(&spec, &input, 5, 50, 1).unwrap();
            net.for_each_batch_norm(&mut |bn| {
                bn.running_average = RunningAverage::Exponential { momentum }
            });
            net
        };
        let mut a = build(0.1);
        let mut follow = Follow {
            setup: &setup,
            data: &data,
            ema: EmaStats::new(&mut a, 0.01).unwrap(),
            evaluator: Evaluator::new(50, 144),
            curve: Vec::new(),
            progress: |_: usize, _: Option<f64>, _: bool| {},
        };
        let mut ta = Trainer::new(config.clone(), 320, 144);
        let mut loss = LossSince::default();
        train_loop(&mut a, &mut ta, &data.train, 30, 10, &mut loss, &mut follow).unwrap();
        assert_eq!(follow.curve.len(), 3);

        let (mut b, mut c) = (build(0.01), build(0.1));
        let (mut tb, mut tc) = (
            Trainer::new(config.clone(), 320, 144),
            Trainer::new(config, 320, 144),
        );
        let mut ev = Evaluator::new(50, 144);
        for p in &follow.curve {
            while tb.step < p.step {
                tb.step(&mut b, &data.train).unwrap();
                tc.step(&mut c, &data.train).unwrap();
            }
            let slow = ev
                .evaluate(&mut b, &data.test, None, None)
                .unwrap()
                .accuracy();
            let ema = ev
                .evaluate(&mut c, &data.test, None, None)
                .unwrap()
                .accuracy();
            population_statistics(&mut c, &data.train, 16, Some(4)).unwrap();
            let pop = ev
                .evaluate(&mut c, &data.test, None, None)
                .unwrap()
                .accuracy();
            clear_population(&mut c);
            assert_eq!((p.ema_slow, p.ema, p.population), (slow, ema, pop), "{p:?}");
        }
        // And the buffers themselves, bit for bit.
        let mut i = 0;
        b.for_each_batch_norm(&mut |bn| {
            assert_eq!(bn.running_mean, follow.ema.means()[i]);
            assert_eq!(bn.running_var, follow.ema.vars()[i]);
            i += 1;
        });
        // The two momenta give different statistics and different accuracies.
        let (mut i, mut differ) = (0, false);
        c.for_each_batch_norm(&mut |bn| {
            differ |= bn.running_mean != follow.ema.means()[i];
            i += 1;
        });
        assert!(differ);
        assert!(
            follow.curve.iter().any(|p| p.ema_slow != p.ema),
            "{:?}",
            follow.curve
        );
    }

    /// A stop answered before a mini-batch of Algorithm 2 ends the pass with `Stopped` and
    /// leaves no population statistics and nothing accumulated: a full pass after it gives
    /// the bits of a pass on a network that was never interrupted. The stop is asked before
    /// every mini-batch (both passes: over given indices and over the first batches).
    #[test]
    fn algorithm_2_stops_before_a_batch_and_leaves_nothing_behind() {
        let train = synthetic(200, 1);
        let spec = model::preset("vgg-mini-bn").unwrap();
        let input = model::resolve_input(&spec, Some(&[1, 12, 12])).unwrap();
        let build = || Network::build(&spec, &input, 9, 16, 1).unwrap();
        let stats = |net: &mut Network| {
            let mut v = Vec::new();
            net.for_each_batch_norm(&mut |bn| {
                v.push((bn.population_mean.clone(), bn.population_var.clone()))
            });
            v
        };
        let idx: Vec<usize> = (0..200).rev().collect();
        let (mut a, mut b) = (build(), build());
        let mut asked = 0;
        population_of(&mut b, &train, &idx, 16, &mut || {
            asked += 1;
            false
        })
        .unwrap();
        assert_eq!(asked, 200 / 16, "asked before each mini-batch");
        let want = stats(&mut b);
        assert!(want.iter().all(|(m, v)| m.is_some() && v.is_some()));

        // Statistics from an earlier pass must not survive a stopped one.
        population_of(&mut a, &train, &idx[..64], 16, &mut || false).unwrap();
        assert!(stats(&mut a).iter().all(|(m, _)| m.is_some()));
        let mut asked = 0;
        let e = population_of(&mut a, &train, &idx, 16, &mut || {
            asked += 1;
            asked == 4
        })
        .unwrap_err();
        assert!(matches!(e, Error::Stopped { .. }), "{e}");
        assert!(stats(&mut a)
            .iter()
            .all(|(m, v)| m.is_none() && v.is_none()));
        population_of(&mut a, &train, &idx, 16, &mut || false).unwrap();
        assert_eq!(
            stats(&mut a),
            want,
            "the stopped pass left something behind"
        );

        let (mut a, mut b) = (build(), build());
        population_statistics(&mut b, &train, 16, None).unwrap();
        let want = stats(&mut b);
        population_statistics(&mut a, &train, 16, Some(2)).unwrap();
        assert!(stats(&mut a).iter().all(|(m, _)| m.is_some()));
        let mut asked = 0;
        let e = crate::train::population_statistics_or_stop(&mut a, &train, 16, None, &mut || {
            asked += 1;
            asked == 2
        })
        .unwrap_err();
        assert!(matches!(e, Error::Stopped { .. }), "{e}");
        assert!(stats(&mut a)
            .iter()
            .all(|(m, v)| m.is_none() && v.is_none()));
        let mut asked = 0;
        crate::train::population_statistics_or_stop(&mut a, &train, 16, None, &mut || {
            asked += 1;
            false
        })
        .unwrap();
        assert_eq!(asked, 200 / 16);
        assert_eq!(
            stats(&mut a),
            want,
            "the stopped pass left something behind"
        );
    }

    /// A stop asked for during the measurements after training (here: at the last step's
    /// evaluation, so the stop is seen by the first Algorithm 2 pass) ends the study with
    /// `Stopped`; the run's checkpoint is that of its last step, so the resumed study trains
    /// nothing more and its results equal an uninterrupted study's.
    #[test]
    fn a_stop_after_training_resumes_from_the_last_step() {
        let data = Split {
            train: synthetic(320, 0),
            test: synthetic(100, 3),
        };
        let setup = PreciseBnSetup {
            lrs: vec![0.05],
            steps: 20,
            eval_every: 10,
            batch_size: 16,
            population_examples: 64,
            test_examples: 100,
            sample_counts: vec![16, 64],
            draws: 2,
            workers: 1,
            eval_batch: 50,
            ..PreciseBnSetup::default()
        };
        let tmp = tempfile::tempdir().unwrap();
        let value = serde_json::to_value(&setup).unwrap();
        let json = |r: &[RunResult]| {
            r.iter()
                .map(|r| {
                    let mut v = serde_json::to_value(r).unwrap();
                    v.as_object_mut().unwrap().remove("seconds");
                    v
                })
                .collect::<Vec<_>>()
        };
        let whole =
            Study::create(&tmp.path().join("whole"), "precise-bn", value.clone(), None).unwrap();
        let want = json(&run_study(&setup, &data, &whole, &|_| {}, &|_, _, _| {}).unwrap());

        let stop = crate::stop::Stop::new();
        let dir = tmp.path().join("cut");
        let cut = Study::create(&dir, "precise-bn", value, None)
            .unwrap()
            .with_stop(stop.clone());
        let ask = |p: Progress<'_>| {
            if p.step == setup.steps && p.evaluated {
                stop.request(2);
            }
        };
        let e = run_study(&setup, &data, &cut, &ask, &|_, _, _| {}).unwrap_err();
        assert!(matches!(e, Error::Stopped { .. }), "{e}");
        let key = setup.jobs()[0].key();
        assert!(dir
            .join("runs")
            .join(&key)
            .join("checkpoint.safetensors")
            .is_file());
        assert!(!dir.join("runs").join(&key).join("result.json").exists());

        let resumed = Study::open(&dir, "precise-bn").unwrap();
        let first = Mutex::new(None);
        let seen = |p: Progress<'_>| {
            first.lock().unwrap().get_or_insert(p.step);
        };
        let got = json(&run_study(&setup, &data, &resumed, &seen, &|_, _, _| {}).unwrap());
        assert_eq!(
            *first.lock().unwrap(),
            Some(setup.steps),
            "resumed at the last step"
        );
        assert_eq!(got, want);
    }
}
