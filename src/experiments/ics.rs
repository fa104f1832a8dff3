//! Why batch normalization works (`bnlab reproduce ics`): Santurkar, Tsipras, Ilyas and Madry,
//! "How Does Batch Normalization Help Optimization?" (NeurIPS 2018), at the scale of one CPU.
//!
//! Two networks, each trained three ways from the same initial weights and batch order:
//! - `vgg-mini-bn` on Fashion-MNIST (three 3x3 convolutions with BN and ReLU; their VGG on
//!   CIFAR-10 scaled down), batches of 128, plain SGD at lr 0.1 (their setup: SGD, lr 0.1,
//!   batch 128; with momentum 0.9 on top, an effective rate of 1, BN's test accuracy with
//!   running statistics swung by 10 points from one evaluation to the next);
//! - the paper's Figure 1 MLP (`mlp-fig1-bn`, 784-100-100-100-10 with sigmoids) on MNIST,
//!   batches of 60, plain SGD at lr 0.1 (the Figure 1 recipe).
//!
//! The variants are `standard` (no BN: `--norm none`), `bn`, and `noisy-bn` (BN followed by
//! their time-varying noise, `--norm noisy-bn`, see [`crate::nn::noise`]). Over each run:
//! - test accuracy (their Figure 2, left);
//! - the distribution of one layer's inputs in training: the values of one channel (or unit) of
//!   the input to the last activation, over the whole training batch of that step, as the
//!   15th, 50th and 85th percentiles (their Figure 2, right; our Figure 1 b/c). For the BN
//!   variants that is the BN output (after the noise in `noisy-bn`);
//! - internal covariate shift ([`crate::probe::ics`], their Definition 2.1) of every weight
//!   layer (their Figures 3 and 4 bottom), on training examples `0..batch` in file order, with
//!   the run's learning rate as the step;
//! - the loss landscape along the gradient ([`crate::probe::landscape`], their Figure 4) on the
//!   same batch, at step sizes of 0.5 to 4 times the learning rate.
//!
//! The measurements change nothing: the network, its BN buffers and its random generators
//! (dropout, noise) are put back bit for bit, so every run trains exactly as it would without
//! them. Runs are independent and flow through `workers` threads, each network
//! single-threaded and bit-reproducible; the study keeps its progress through `study::Study`
//! (finished runs and checkpoints of runs in training, with their curves so far), so a stopped
//! study continues with `--resume DIR` bit for bit.

use crate::data::Split;
use crate::model::{self, NormChoice};
use crate::network::Network;
use crate::optim::Schedule;
use crate::probe;
use crate::study::{Study as StudyDir, Tracked};
use crate::train::{percentile, Evaluator, Observer, Order, TrainConfig, Trainer};
use crate::{Error, Result};
use std::time::Instant;

/// The three ways each network is trained, in report order: their `--norm` values.
pub const VARIANTS: [&str; 3] = ["none", "bn", "noisy-bn"];

/// The variant's name in reports: `standard`, `bn`, `noisy-bn`.
pub fn variant_name(norm: &str) -> &str {
    if norm == "none" {
        "standard"
    } else {
        norm
    }
}

/// One network of the study and how it is trained and measured.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NetSetup {
    /// Short name in reports and run keys (`vgg`, `mlp`).
    pub name: String,
    /// The BN preset; the other variants are made from it with `--norm`.
    pub model: String,
    /// `fashion-mnist` or `mnist`.
    pub dataset: String,
    /// Training steps.
    pub steps: usize,
    /// Examples per mini-batch (also the measurement batch).
    pub batch_size: usize,
    /// Constant SGD learning rate (also the step of the ICS measurement).
    pub lr: f64,
    /// SGD momentum.
    pub momentum: f32,
    /// Steps between test evaluations.
    pub eval_every: usize,
    /// Steps between ICS and landscape measurements.
    pub measure_every: usize,
    /// Steps between records of the layer-input distribution.
    pub probe_every: usize,
    /// Channels (feature maps) or units of the probed layer's output; the probe follows
    /// channel `probe_channel`, all its positions.
    pub probe_channels: usize,
    /// The channel (or unit) followed.
    pub probe_channel: usize,
}

/// Settings of the study; `default()` is the full run (under 30 minutes on two cores),
/// `quick()` the whole path in a minute or two.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct IcsSetup {
    /// The networks.
    pub nets: Vec<NetSetup>,
    /// The landscape's step sizes, as multiples of the learning rate.
    pub eta_factors: Vec<f64>,
    /// Seed of every run's initialization, batch order and noise.
    pub seed: u64,
    /// Runs trained at once.
    pub workers: usize,
    /// Examples per inference batch.
    pub eval_batch: usize,
}

impl Default for IcsSetup {
    fn default() -> Self {
        IcsSetup {
            nets: vec![
                NetSetup {
                    name: "vgg".into(),
                    model: "vgg-mini-bn".into(),
                    dataset: "fashion-mnist".into(),
                    steps: 3000,
                    batch_size: 128,
                    lr: 0.1,
                    momentum: 0.0,
                    eval_every: 250,
                    measure_every: 100,
                    probe_every: 10,
                    probe_channels: 64,
                    probe_channel: 0,
                },
                NetSetup {
                    name: "mlp".into(),
                    model: "mlp-fig1-bn".into(),
                    dataset: "mnist".into(),
                    steps: 20_000,
                    batch_size: 60,
                    lr: 0.1,
                    momentum: 0.0,
                    eval_every: 1000,
                    measure_every: 500,
                    probe_every: 50,
                    probe_channels: 100,
                    probe_channel: 0,
                },
            ],
            eta_factors: vec![0.5, 1.0, 2.0, 4.0],
            seed: 1,
            workers: 2,
            eval_batch: 500,
        }
    }
}

impl IcsSetup {
    /// The whole path in a minute or two: 200 steps of the VGG net, 2,000 of the MLP.
    pub fn quick() -> Self {
        let mut s = Self::default();
        for (net, (steps, eval, measure, probe)) in s
            .nets
            .iter_mut()
            .zip([(200, 50, 25, 5), (2000, 250, 250, 25)])
        {
            net.steps = steps;
            net.eval_every = eval;
            net.measure_every = measure;
            net.probe_every = probe;
        }
        s
    }

    /// Refuse settings that cannot run, naming the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String, why: String| Err(Error::config(&what, why));
        if self.nets.is_empty() {
            return bad("networks".into(), "need at least one".into());
        }
        for n in &self.nets {
            let what = |field: &str| format!("{} {field}", n.name);
            if !matches!(n.dataset.as_str(), "mnist" | "fashion-mnist") {
                return bad(
                    what("dataset"),
                    format!("'{}' (mnist or fashion-mnist)", n.dataset),
                );
            }
            for (field, v) in [
                ("steps", n.steps),
                ("batch size", n.batch_size),
                ("eval_every", n.eval_every),
                ("measure_every", n.measure_every),
                ("probe_every", n.probe_every),
                ("probe_channels", n.probe_channels),
            ] {
                if v == 0 {
                    return bad(what(field), "must be at least 1".into());
                }
            }
            if n.batch_size < 2 {
                return bad(what("batch size"), "BN needs at least 2".into());
            }
            if n.probe_channel >= n.probe_channels {
                return bad(
                    what("probe_channel"),
                    format!("{} of {} channels", n.probe_channel, n.probe_channels),
                );
            }
            if !(n.lr.is_finite() && n.lr > 0.0) {
                return bad(what("lr"), format!("{} (must be > 0)", n.lr));
            }
        }
        if self.eta_factors.is_empty() || self.eta_factors.iter().any(|e| !e.is_finite()) {
            return bad("eta factors".into(), "need at least one, all finite".into());
        }
        if self.workers == 0 {
            return bad("workers".into(), "at least 1".into());
        }
        Ok(())
    }

    /// Every run, in report order: for each net, the three variants.
    pub fn jobs(&self) -> Vec<Job> {
        self.nets
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                VARIANTS.iter().map(move |v| Job {
                    net: i,
                    key: format!("{}-{}", n.name, variant_name(v)),
                    norm: v.to_string(),
                })
            })
            .collect()
    }
}

/// One training run.
#[derive(Clone, Debug)]
pub struct Job {
    /// The index of its net in `IcsSetup::nets`.
    pub net: usize,
    /// `--norm`: `none`, `bn` or `noisy-bn`.
    pub norm: String,
    /// A name for files and progress: `vgg-standard`, `mlp-noisy-bn`.
    pub key: String,
}

/// A test evaluation.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AccuracyPoint {
    /// Steps done.
    pub step: usize,
    /// Test accuracy (fraction).
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub test_accuracy: f64,
    /// Mean training loss since the previous evaluation.
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub train_loss: f64,
}

/// The followed channel's values over one training batch.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct InputPoint {
    /// Steps done (the batch is that of step `step`).
    pub step: usize,
    /// 15th percentile.
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub p15: f64,
    /// Median.
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub p50: f64,
    /// 85th percentile.
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub p85: f64,
}

/// ICS of one weight layer at one measurement.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IcsValue {
    /// `|G - G'|_2`.
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub l2_diff: f64,
    /// `<G, G'> / (|G| |G'|)` (`None`: a zero gradient).
    pub cosine: Option<f64>,
    /// `|G|_2`.
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub grad_norm: f64,
}

/// One measurement of ICS and the landscape.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Measurement {
    /// Steps done.
    pub step: usize,
    /// Per weight layer, in `RunResult::layers` order.
    pub ics: Vec<IcsValue>,
    /// The loss at the parameters.
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub loss0: f64,
    /// `|g|_2`.
    #[serde(deserialize_with = "crate::report::nan_from_null")]
    pub grad_norm: f64,
    /// `L(theta - eta g)` per step size (`RunResult::etas` order).
    #[serde(deserialize_with = "crate::report::nans_from_nulls")]
    pub losses: Vec<f64>,
    /// `|grad L(theta - eta g) - g|_2` per step size.
    #[serde(deserialize_with = "crate::report::nans_from_nulls")]
    pub grad_changes: Vec<f64>,
    /// The effective beta-smoothness (`None`: no nonzero step).
    pub beta_smoothness: Option<f64>,
}

impl Measurement {
    /// The range of the loss over the step sizes (their "loss landscape" band).
    pub fn loss_range(&self) -> f64 {
        range(&self.losses)
    }

    /// The largest gradient change over the step sizes (their "gradient predictiveness").
    pub fn max_grad_change(&self) -> f64 {
        self.grad_changes.iter().copied().fold(f64::NAN, f64::max)
    }
}

/// `max - min` (NaN if any value is NaN or there is none).
pub fn range(v: &[f64]) -> f64 {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    hi - lo
}

/// What a run left.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    /// The weight layers' `state_dict` names (ICS per layer follows this order).
    pub layers: Vec<String>,
    /// The landscape's step sizes.
    pub etas: Vec<f64>,
    /// Test evaluations.
    pub accuracy: Vec<AccuracyPoint>,
    /// The followed layer input's percentiles.
    pub inputs: Vec<InputPoint>,
    /// ICS and landscape measurements.
    pub measurements: Vec<Measurement>,
    /// The final test accuracy; `None` after a divergence.
    pub final_test_accuracy: Option<f64>,
    /// The step at which training stopped on a NaN or infinite loss or weight.
    pub diverged_at: Option<usize>,
    /// Training steps.
    pub steps: usize,
    /// Wall-clock seconds (kept out of results.json).
    #[serde(default)]
    pub seconds: f64,
}

impl RunResult {
    /// The mean test accuracy of the last 3 evaluations (fewer if there are fewer): the end of
    /// a run at a constant learning rate, less noisy than its last evaluation alone. `None`
    /// after a divergence or without evaluations.
    pub fn end_accuracy(&self) -> Option<f64> {
        self.diverged_at.is_none().then_some(())?;
        let last = &self.accuracy[self.accuracy.len().saturating_sub(3)..];
        (!last.is_empty()).then(|| mean(last.iter().map(|p| p.test_accuracy)))
    }
}

/// A finished or resumed run, for progress.
pub struct Done<'a> {
    /// The run.
    pub job: &'a Job,
    /// Its result.
    pub result: &'a RunResult,
    /// Taken from an earlier invocation's output folder.
    pub resumed: bool,
    /// Runs finished so far (this one included).
    pub finished: usize,
    /// Runs in the study.
    pub total: usize,
}

/// Make `net` a replica of the data-parallel run `d` for batches of `batch`, refusing slices
/// that would leave BN fewer than 2 examples per process. The training steps and evaluations
/// run data-parallel; the measurements (ICS, the landscape) run whole on every rank, as one
/// process runs them.
fn join(net: &mut Network, batch: usize, d: &crate::dist::Dist) -> Result<()> {
    crate::study::join_replica(net, batch, d, "reproduce ics")
}

/// Check, before anything is trained or written, that every run of the study can train as a
/// replica of the data-parallel run `d`: an error naming the first that cannot.
pub fn check_data_parallel(setup: &IcsSetup, d: &crate::dist::Dist) -> Result<()> {
    setup.validate()?;
    for job in setup.jobs() {
        let ns = &setup.nets[job.net];
        let spec = model::apply_norm(&model::preset(&ns.model)?, NormChoice::parse(&job.norm)?)?;
        // Both data sets hold 28 x 28 images (the MLP's input is fixed, 784).
        let input = model::resolve_input(&spec, None)
            .or_else(|_| model::resolve_input(&spec, Some(&[1, 28, 28])))?;
        let mut net = Network::build(&spec, &input, setup.seed, ns.batch_size, 1)?;
        join(&mut net, ns.batch_size, d)?;
        net.set_dist(None)?;
    }
    Ok(())
}

/// Training steps between a run's checkpoints.
pub const CHECKPOINT_EVERY: usize = 500;

/// Every run of the study, in `setup.jobs()` order; `data` holds each net's data set (in
/// `setup.nets` order). Kept in `study` like every study (see the module doc). A stop request
/// ends the runs in training after their current step, checkpointed, with `Error::Stopped`.
pub fn run_study(
    setup: &IcsSetup,
    data: &[&Split],
    study: &StudyDir,
    on_done: &(dyn Fn(Done<'_>) + Sync),
) -> Result<Vec<RunResult>> {
    setup.validate()?;
    if data.len() != setup.nets.len() {
        return Err(Error::config(
            "reproduce ics",
            format!("{} data sets for {} nets", data.len(), setup.nets.len()),
        ));
    }
    let jobs = setup.jobs();
    let keys: Vec<String> = jobs.iter().map(|j| j.key.clone()).collect();
    // The longest runs first, so that the two workers end together.
    let mut order: Vec<usize> = (0..jobs.len()).collect();
    order.sort_by_key(|&i| {
        let n = &setup.nets[jobs[i].net];
        std::cmp::Reverse(n.steps * n.batch_size * if n.dataset == "mnist" { 1 } else { 20 })
    });
    crate::study::run_jobs(
        study,
        "reproduce ics",
        &keys,
        &order,
        crate::study::share_cores(setup.workers, jobs.len()).0,
        &|i| run_job(setup, &jobs[i], data[jobs[i].net], study),
        &|d| {
            on_done(Done {
                job: &jobs[d.index],
                result: d.result,
                resumed: d.resumed,
                finished: d.finished,
                total: d.total,
            })
        },
    )
}

/// The runs already finished, in `setup.jobs()` order; `None` for the others (`--report-only`).
pub fn finished_results(setup: &IcsSetup, study: &StudyDir) -> Result<Vec<Option<RunResult>>> {
    setup.jobs().iter().map(|j| study.result(&j.key)).collect()
}

/// The top-level layer whose output is the input of the network's last activation (ReLU or
/// Sigmoid): the layer the probe follows.
pub fn probe_layer(net: &Network) -> Option<usize> {
    let last = net
        .spec
        .layers
        .iter()
        .rposition(|c| matches!(c.node, model::Node::Sigmoid | model::Node::Relu))?;
    last.checked_sub(1)
}

/// The measurements of a run, made between training steps.
struct Follow<'a> {
    setup: &'a NetSetup,
    data: &'a Split,
    evaluator: Evaluator,
    probe_layer: usize,
    etas: Vec<f64>,
    scratch: Vec<f32>,
    result: RunResult,
    last_probe: usize,
}

impl Follow<'_> {
    /// The followed channel's percentiles over the batch of the step just taken, read from the
    /// activations that step left in the network.
    fn record_input(&mut self, net: &mut Network, step: usize) {
        if step == self.last_probe || !step.is_multiple_of(self.setup.probe_every) {
            return;
        }
        self.last_probe = step;
        let out = net.body.output_of(self.probe_layer);
        let width = out.len() / net.max_batch().max(1);
        let positions = width / self.setup.probe_channels;
        let c = self.setup.probe_channel;
        let b = self.setup.batch_size;
        // A data-parallel run holds this rank's slice of the batch: the slices' values are
        // gathered (each at its place among zeros, summed over the ranks; adding zeros is
        // exact), so every rank has the whole batch's, as one process does.
        let dist = net.dist().cloned();
        let rows = dist.as_ref().map_or(0..b, |d| d.slice(b));
        self.scratch.clear();
        self.scratch.resize(rows.start * positions, 0.0);
        for i in 0..rows.len() {
            let base = i * width + c * positions;
            self.scratch.extend_from_slice(&out[base..base + positions]);
        }
        if let Some(d) = dist {
            self.scratch.resize(b * positions, 0.0);
            d.comm.sum_f32(&mut self.scratch);
        }
        let p = |v: &mut [f32], q| percentile(v, q);
        self.result.inputs.push(InputPoint {
            step,
            p15: p(&mut self.scratch, 15.0),
            p50: p(&mut self.scratch, 50.0),
            p85: p(&mut self.scratch, 85.0),
        });
    }

    fn measure(&mut self, net: &mut Network, step: usize) -> Result<()> {
        let b = self.setup.batch_size;
        let ics = probe::ics(net, &self.data.train, 0, b, self.setup.lr)?;
        let land = probe::landscape(net, &self.data.train, 0, b, &self.etas)?;
        self.result.measurements.push(Measurement {
            step,
            ics: ics
                .into_iter()
                .map(|l| IcsValue {
                    l2_diff: l.l2_diff,
                    cosine: l.cosine,
                    grad_norm: l.grad_norm,
                })
                .collect(),
            loss0: land.loss0,
            grad_norm: land.grad_norm,
            losses: land.points.iter().map(|p| p.loss).collect(),
            grad_changes: land.points.iter().map(|p| p.grad_change).collect(),
            beta_smoothness: land.beta_smoothness,
        });
        Ok(())
    }
}

impl Observer for Follow<'_> {
    fn evaluate(&mut self, net: &mut Network, step: usize, mean_loss: f64) -> Result<()> {
        // Before the test set overwrites the training batch's activations.
        self.record_input(net, step);
        let acc = self
            .evaluator
            .evaluate(net, &self.data.test, None, None)?
            .accuracy();
        self.result.accuracy.push(AccuracyPoint {
            step,
            test_accuracy: acc,
            train_loss: mean_loss,
        });
        Ok(())
    }

    fn after_step(
        &mut self,
        net: &mut Network,
        trainer: &Trainer,
        _loss: f64,
        _since: &crate::train::LossSince,
        _evaluated: bool,
    ) -> Result<()> {
        let step = trainer.step;
        self.record_input(net, step);
        if step.is_multiple_of(self.setup.measure_every) || step == self.setup.steps {
            self.measure(net, step)?;
        }
        Ok(())
    }
}

impl Tracked for Follow<'_> {
    type Saved = (RunResult, usize);
    fn save(&self) -> Self::Saved {
        (self.result.clone(), self.last_probe)
    }
    fn restore(&mut self, saved: Self::Saved) {
        (self.result, self.last_probe) = saved;
    }
}

/// Train and measure one run; checkpointed in `study` (continued from its checkpoint if it has
/// one). A stop request ends it after its current step with `Error::Stopped`.
pub fn run_job(setup: &IcsSetup, job: &Job, data: &Split, study: &StudyDir) -> Result<RunResult> {
    let t0 = Instant::now();
    let ns = &setup.nets[job.net];
    let spec = model::apply_norm(&model::preset(&ns.model)?, NormChoice::parse(&job.norm)?)?;
    let shape = data.train.shape();
    let input = model::resolve_input(&spec, Some(&shape))?;
    let b = ns.batch_size;
    let threads = crate::study::share_cores(setup.workers, setup.jobs().len()).1;
    let mut net = Network::build(&spec, &input, setup.seed, b.max(setup.eval_batch), threads)?;
    let probe_layer = probe_layer(&net).ok_or_else(|| {
        Error::config(
            "reproduce ics",
            format!("{} has no ReLU or Sigmoid to follow the input of", ns.model),
        )
    })?;
    // The probe reads the activation's input: that layer keeps its output.
    net.body.keep_output(probe_layer);
    let width = net.body.output_of(probe_layer).len() / net.max_batch().max(1);
    if width == 0 || !width.is_multiple_of(ns.probe_channels) {
        return Err(Error::config(
            "reproduce ics",
            format!(
                "{}: the followed layer has {width} values per example, not a multiple of {} channels",
                ns.model, ns.probe_channels
            ),
        ));
    }
    let config = TrainConfig {
        steps: ns.steps,
        batch_size: b,
        lr: ns.lr,
        momentum: ns.momentum,
        weight_decay: 0.0,
        schedule: Schedule::Constant,
        seed: setup.seed,
        order: Order::Shuffle,
        eval_every: ns.eval_every,
        threads,
        augment: crate::train::Augment::None,
        bn: Default::default(),
    };
    config.validate(net.has_batch_norm())?;
    if let Some(d) = study.dist() {
        join(&mut net, b, d)?;
    }
    let features = data.train.features();
    let mut trainer = Trainer::new(config, data.train.len(), features);
    let layers = probe::weight_layers(&mut net);
    let etas: Vec<f64> = setup.eta_factors.iter().map(|f| f * ns.lr).collect();
    let mut follow = Follow {
        setup: ns,
        data,
        evaluator: Evaluator::new(setup.eval_batch, features),
        probe_layer,
        etas: etas.clone(),
        scratch: Vec::with_capacity(b * width / ns.probe_channels),
        result: RunResult {
            layers,
            etas,
            accuracy: Vec::new(),
            inputs: Vec::new(),
            measurements: Vec::new(),
            final_test_accuracy: None,
            diverged_at: None,
            steps: ns.steps,
            seconds: 0.0,
        },
        last_probe: 0,
    };
    let mut loss = study
        .resume_run(&job.key, &mut net, &mut trainer, &mut follow)?
        .unwrap_or_default();
    let before = follow.result.seconds;
    let diverged_at = match study.train_run(
        &job.key,
        &mut net,
        &mut trainer,
        &data.train,
        ns.steps,
        ns.eval_every,
        CHECKPOINT_EVERY,
        &mut loss,
        &mut follow,
    ) {
        Ok(()) => None,
        Err(Error::Diverged { step, .. }) => Some(step),
        Err(e) => return Err(e),
    };
    let mut r = follow.result;
    r.final_test_accuracy = if diverged_at.is_none() {
        r.accuracy.last().map(|p| p.test_accuracy)
    } else {
        None
    };
    r.diverged_at = diverged_at;
    r.seconds = before + t0.elapsed().as_secs_f64();
    Ok(r)
}

/// Mean of the finite values (NaN if none).
pub fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (mut s, mut n) = (0.0, 0usize);
    for x in v.into_iter().filter(|x| x.is_finite()) {
        s += x;
        n += 1;
    }
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// How much the followed layer input's distribution moves: the mean over consecutive records
/// of `(|dp15| + |dp50| + |dp85|) / 3`, in the input's units.
pub fn input_shift(inputs: &[InputPoint]) -> f64 {
    mean(inputs.windows(2).map(|w| {
        ((w[1].p15 - w[0].p15).abs() + (w[1].p50 - w[0].p50).abs() + (w[1].p85 - w[0].p85).abs())
            / 3.0
    }))
}

/// `input_shift` relative to the distribution's mean width `p85 - p15`: how far it moves
/// between records in units of its own spread (scale-free, so nets with and without BN
/// compare).
pub fn relative_input_shift(inputs: &[InputPoint]) -> f64 {
    input_shift(inputs) / mean(inputs.iter().map(|p| p.p85 - p.p15))
}

/// Per weight layer, the mean over the measurements of `l2_diff / grad_norm` (ICS relative to
/// the gradient's size).
pub fn mean_relative_ics(r: &RunResult) -> Vec<f64> {
    (0..r.layers.len())
        .map(|l| {
            mean(r.measurements.iter().filter_map(|m| {
                let v = m.ics.get(l)?;
                (v.grad_norm > 0.0).then(|| v.l2_diff / v.grad_norm)
            }))
        })
        .collect()
}

/// Per weight layer, the mean over the measurements of the cosine between `G` and `G'`.
pub fn mean_cosine(r: &RunResult) -> Vec<f64> {
    (0..r.layers.len())
        .map(|l| mean(r.measurements.iter().filter_map(|m| m.ics.get(l)?.cosine)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(step: usize, p15: f64, p50: f64, p85: f64) -> InputPoint {
        InputPoint {
            step,
            p15,
            p50,
            p85,
        }
    }

    #[test]
    fn shift_measures_movement_between_records() {
        let still = [pt(0, -1.0, 0.0, 1.0), pt(10, -1.0, 0.0, 1.0)];
        assert_eq!(input_shift(&still), 0.0);
        let moving = [
            pt(0, -1.0, 0.0, 1.0),
            pt(10, 0.0, 1.0, 2.0),
            pt(20, -1.0, 0.0, 1.0),
        ];
        assert_eq!(input_shift(&moving), 1.0);
        assert_eq!(relative_input_shift(&moving), 0.5);
        assert!(input_shift(&moving[..1]).is_nan());
    }

    #[test]
    fn jobs_cover_every_net_and_variant() {
        let s = IcsSetup::default();
        s.validate().unwrap();
        let keys: Vec<String> = s.jobs().into_iter().map(|j| j.key).collect();
        assert_eq!(
            keys,
            [
                "vgg-standard",
                "vgg-bn",
                "vgg-noisy-bn",
                "mlp-standard",
                "mlp-bn",
                "mlp-noisy-bn"
            ]
        );
        IcsSetup::quick().validate().unwrap();
        let mut bad = IcsSetup::default();
        bad.nets[0].probe_channel = 64;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("probe_channel"));
    }
}
