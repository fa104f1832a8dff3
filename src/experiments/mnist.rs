//! Section 4.1 of the paper, Figure 1: a 784-100-100-100-10 sigmoid network on MNIST, with and
//! without batch normalization, trained by plain SGD on mini-batches of 60 with weights drawn
//! from N(0, 0.1^2). We follow test accuracy over training and, for one fixed sigmoid of the last
//! hidden layer, the 15th, 50th and 85th percentiles of its input over the test images.
//!
//! The two networks train at the same time, one per thread; each is single-threaded, which is
//! the fastest use of two cores for matrices this small and keeps every run bit-reproducible.

use crate::data::Split;
use crate::dist::Dist;
use crate::network::Network;
use crate::optim::Schedule;
use crate::report::{CurvePoint, MnistReport, VariantRun};
use crate::study::{Study, Tracked};
use crate::train::{
    percentile, population_statistics_or_stop, Evaluator, LossSince, Observer, Order, Probe,
    TrainConfig, Trainer,
};
use crate::{Error, Result};
use std::time::Instant;

/// Settings of the reproduction; the defaults are the paper's.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct MnistSetup {
    /// Training steps of each net.
    pub steps: usize,
    /// Examples per mini-batch (the paper: 60).
    pub batch_size: usize,
    /// SGD learning rate (constant).
    pub lr: f64,
    /// Standard deviation of the Gaussian initial weights.
    pub init_std: f64,
    /// Seed of the weights and batch orders.
    pub seed: u64,
    /// Steps between evaluations.
    pub eval_every: usize,
    /// The sigmoid of the last hidden layer whose input is followed.
    pub probe_unit: usize,
    /// Examples per inference batch.
    pub eval_batch: usize,
    /// `--norm`: every BatchNorm of the BN networks replaced (`gn:4`, `brn`, ...); `None`:
    /// batch normalization, as in the paper.
    #[serde(default)]
    pub norm: Option<String>,
}

impl Default for MnistSetup {
    fn default() -> Self {
        MnistSetup {
            steps: 50_000,
            batch_size: 60,
            lr: 0.1,
            init_std: 0.1,
            seed: 1,
            eval_every: 500,
            probe_unit: 0,
            eval_batch: 500,
            norm: None,
        }
    }
}

/// Progress of one variant, reported every few steps.
pub struct Progress<'a> {
    /// The net's name.
    pub variant: &'a str,
    /// Steps done.
    pub step: usize,
    /// Steps of the run.
    pub steps: usize,
    /// The latest step's loss (at an evaluation: the mean since the previous one; NaN when
    /// unknown).
    pub loss: f64,
    /// The latest test accuracy (fraction 0..1), if evaluated yet.
    pub last_accuracy: Option<f64>,
    /// An evaluation just happened (`last_accuracy` is new).
    pub evaluated: bool,
    /// The run is done (now, or in an earlier session of the study).
    pub finished: bool,
}

/// The layer whose output is the input of the sigmoid that Figure 1 (b, c) follows: the last
/// hidden layer's pre-activation (after BN in the BN net), i.e. the top-level layer before the
/// last Sigmoid.
pub fn probe_layer(net: &Network) -> Option<usize> {
    let last_sigmoid = net
        .spec
        .layers
        .iter()
        .rposition(|c| matches!(c.node, crate::model::Node::Sigmoid))?;
    last_sigmoid.checked_sub(1)
}

/// Figure 1's measurements at every evaluation: accuracy and the probe's percentiles.
struct Follow<'a> {
    evaluator: Evaluator,
    data: &'a Split,
    probe: Probe,
    preset: &'static str,
    steps: usize,
    curve: Vec<CurvePoint>,
    train_seconds: f64,
    t0: Instant,
    on_progress: &'a (dyn Fn(Progress<'_>) + Sync),
}

impl Follow<'_> {
    fn point(&mut self, net: &mut Network, step: usize, train_loss: f64) -> Result<CurvePoint> {
        let mut ev = self
            .evaluator
            .evaluate(net, &self.data.test, Some(self.probe), None)?;
        Ok(CurvePoint {
            step,
            test_accuracy: ev.accuracy(),
            p15: percentile(&mut ev.probe, 15.0),
            p50: percentile(&mut ev.probe, 50.0),
            p85: percentile(&mut ev.probe, 85.0),
            train_loss,
        })
    }

    fn report(&self, step: usize, loss: f64, evaluated: bool, finished: bool) {
        (self.on_progress)(Progress {
            variant: self.preset,
            step,
            steps: self.steps,
            loss,
            last_accuracy: self.curve.last().map(|p| p.test_accuracy),
            evaluated,
            finished,
        });
    }
}

impl Observer for Follow<'_> {
    fn evaluate(&mut self, net: &mut Network, step: usize, mean_loss: f64) -> Result<()> {
        self.train_seconds += self.t0.elapsed().as_secs_f64();
        let point = self.point(net, step, mean_loss)?;
        self.curve.push(point);
        self.report(step, mean_loss, true, false);
        self.t0 = Instant::now();
        Ok(())
    }
    fn after_step(
        &mut self,
        _net: &mut Network,
        trainer: &Trainer,
        loss: f64,
        _since: &LossSince,
        evaluated: bool,
    ) -> Result<()> {
        if !evaluated && trainer.step.is_multiple_of(100) {
            self.report(trainer.step, loss, false, false);
        }
        Ok(())
    }
}

impl Tracked for Follow<'_> {
    type Saved = (Vec<CurvePoint>, f64);
    fn save(&self) -> Self::Saved {
        (
            self.curve.clone(),
            self.train_seconds + self.t0.elapsed().as_secs_f64(),
        )
    }
    fn restore(&mut self, (curve, seconds): Self::Saved) {
        self.curve = curve;
        self.train_seconds = seconds;
        self.t0 = Instant::now();
    }
}

/// Train one variant and follow it, as run `preset` of `study`: a finished run's result is
/// read back, a started one continues from its checkpoint (every `eval_every` steps, and when a
/// stop is requested: `Error::Stopped`).
pub fn run_variant(
    preset: &'static str,
    setup: &MnistSetup,
    data: &Split,
    study: &Study,
    on_progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<VariantRun> {
    if let Some(done) = study.result::<VariantRun>(preset)? {
        let last = done.curve.last();
        on_progress(Progress {
            variant: preset,
            step: setup.steps,
            steps: setup.steps,
            loss: last.map_or(f64::NAN, |p| p.train_loss),
            last_accuracy: last.map(|p| p.test_accuracy),
            evaluated: true,
            finished: true,
        });
        return Ok(done);
    }
    let features = data.train.features();
    let max_batch = setup.batch_size.max(setup.eval_batch);
    // Both nets train at once, sharing the cores; data-parallel, one at a time.
    let at_once = if study.dist().is_some() {
        1
    } else {
        VARIANTS.len()
    };
    let threads = crate::study::share_cores(at_once, at_once).1;
    let mut net = Network::preset_with_norm(
        preset,
        setup.norm.as_deref(),
        setup.seed,
        max_batch,
        threads,
    )?;
    let config = TrainConfig {
        steps: setup.steps,
        batch_size: setup.batch_size,
        lr: setup.lr,
        momentum: 0.0,
        weight_decay: 0.0,
        schedule: Schedule::Constant,
        seed: setup.seed,
        order: Order::Shuffle,
        eval_every: setup.eval_every,
        threads,
        augment: crate::train::Augment::None,
        bn: Default::default(),
    };
    config.validate(net.has_batch_norm())?;
    join(&mut net, setup, study.dist())?;
    let mut trainer = Trainer::new(config, data.train.len(), features);
    let evaluator = Evaluator::new(setup.eval_batch, features);
    let probe = Probe {
        layer: probe_layer(&net)
            .ok_or_else(|| Error::config("--model", "Figure 1 needs a sigmoid MLP"))?,
        unit: setup.probe_unit,
    };
    // The probe reads the sigmoid's input: that BN layer keeps its output.
    net.body.keep_output(probe.layer);
    let mut follow = Follow {
        evaluator,
        data,
        probe,
        preset,
        steps: setup.steps,
        curve: Vec::new(),
        train_seconds: 0.0,
        t0: Instant::now(),
        on_progress,
    };
    let mut loss = match study.resume_run(preset, &mut net, &mut trainer, &mut follow)? {
        Some(loss) => loss,
        None => {
            let first = follow.point(&mut net, 0, f64::NAN)?;
            follow.curve.push(first);
            LossSince::default()
        }
    };
    follow.report(trainer.step, f64::NAN, false, false);
    follow.t0 = Instant::now();
    study.train_run(
        preset,
        &mut net,
        &mut trainer,
        &data.train,
        setup.steps,
        setup.eval_every,
        setup.eval_every,
        &mut loss,
        &mut follow,
    )?;
    let Follow {
        mut evaluator,
        curve,
        train_seconds,
        ..
    } = follow;
    let final_running = curve.last().map_or(0.0, |p| p.test_accuracy);
    let final_population = if net.has_batch_norm() {
        // A stop in this pass (over the whole training set) ends the run; the resume redoes
        // it from the checkpoint of the last step.
        population_statistics_or_stop(&mut net, &data.train, setup.batch_size, None, &mut || {
            study.agree_stop()
        })
        .map_err(|e| match e {
            Error::Stopped { .. } => Error::Stopped { step: setup.steps },
            e => e,
        })?;
        evaluator
            .evaluate(&mut net, &data.test, None, None)?
            .accuracy()
    } else {
        final_running
    };
    let run = VariantRun {
        name: preset.to_string(),
        curve,
        final_running,
        final_population,
        train_seconds,
    };
    study.finish(preset, &run)?;
    let last = run.curve.last();
    on_progress(Progress {
        variant: preset,
        step: setup.steps,
        steps: setup.steps,
        loss: last.map_or(f64::NAN, |p| p.train_loss),
        last_accuracy: last.map(|p| p.test_accuracy),
        evaluated: true,
        finished: true,
    });
    Ok(run)
}

/// The two nets of the study, in report order.
pub const VARIANTS: [&str; 2] = ["mlp-fig1", "mlp-fig1-bn"];

/// Make `net` a replica of the data-parallel run `dist` (nothing without one), refusing what
/// that run cannot train: ghost batches that would straddle two processes (`--norm ghost:G`
/// with slices that are not multiples of G) or a batch whose slices are too small for BN.
fn join(net: &mut Network, setup: &MnistSetup, dist: Option<&Dist>) -> Result<()> {
    match dist {
        Some(d) => crate::study::join_replica(net, setup.batch_size, d, "reproduce mnist"),
        None => Ok(()),
    }
}

/// Check, before anything is trained or written, that every run of the study can train as a
/// replica of the data-parallel run `dist` (see [`reproduce`]): an error naming the first run
/// that cannot.
pub fn check_data_parallel(setup: &MnistSetup, dist: &Dist) -> Result<()> {
    let max_batch = setup.batch_size.max(setup.eval_batch);
    for preset in VARIANTS {
        let mut net =
            Network::preset_with_norm(preset, setup.norm.as_deref(), setup.seed, max_batch, 1)?;
        join(&mut net, setup, Some(dist))?;
        net.set_dist(None)?;
    }
    Ok(())
}

/// Train both networks (in parallel, one thread each) as runs of `study`, and collect the
/// report. A stop request ends both after their current step (`Error::Stopped`), each with its
/// checkpoint written; calling again with the study opened continues them. A data-parallel
/// study (`Study::with_dist`) trains them one after the other, each on every rank, with the
/// global batch split over the ranks (see `dist`).
pub fn reproduce(
    setup: &MnistSetup,
    data: &Split,
    study: &Study,
    on_progress: &(dyn Fn(Progress<'_>) + Sync),
) -> Result<MnistReport> {
    if setup.steps == 0 || setup.eval_every == 0 || setup.batch_size < 2 {
        return Err(Error::config(
            "reproduce mnist",
            "steps and eval-every must be positive and the batch at least 2",
        ));
    }
    if study.dist().is_some() {
        // Data-parallel: every rank trains each net in turn (each run all the ranks'), the
        // stop agreed before each; only rank 0 writes (`Study::with_dist`).
        let mut variants = Vec::new();
        for v in VARIANTS {
            if study.agree_stop() {
                return Err(Error::Stopped { step: 0 });
            }
            variants.push(run_variant(v, setup, data, study, on_progress)?);
        }
        return Ok(MnistReport {
            setup: setup_json(setup)?,
            variants,
        });
    }
    let (plain, bn) = std::thread::scope(|s| {
        let h = s.spawn(|| run_variant(VARIANTS[0], setup, data, study, on_progress));
        let bn = run_variant(VARIANTS[1], setup, data, study, on_progress);
        let plain = h
            .join()
            .unwrap_or_else(|_| Err(Error::config("reproduce mnist", "training thread panicked")));
        (plain, bn)
    });
    // A stop reaches both threads: report it rather than the other's error, if any.
    let (plain, bn) = match (plain, bn) {
        (Err(e @ Error::Stopped { .. }), _) | (_, Err(e @ Error::Stopped { .. })) => return Err(e),
        (p, b) => (p?, b?),
    };
    Ok(MnistReport {
        setup: setup_json(setup)?,
        variants: vec![plain, bn],
    })
}

/// The report of the runs of `study` that finished, and the names of those that did not
/// (`reproduce mnist --report-only`).
pub fn partial_report(setup: &MnistSetup, study: &Study) -> Result<(MnistReport, Vec<String>)> {
    let mut variants = Vec::new();
    let mut missing = Vec::new();
    for name in VARIANTS {
        match study.result::<VariantRun>(name)? {
            Some(v) => variants.push(v),
            None => missing.push(name.to_string()),
        }
    }
    Ok((
        MnistReport {
            setup: setup_json(setup)?,
            variants,
        },
        missing,
    ))
}

/// The settings as results.json's `setup`.
fn setup_json(setup: &MnistSetup) -> Result<serde_json::Value> {
    let setup_json =
        serde_json::to_value(setup).map_err(|e| Error::config("setup", e.to_string()))?;
    let mut setup_json = setup_json;
    if let Some(obj) = setup_json.as_object_mut() {
        obj.insert(
            "dataset".into(),
            "MNIST (60,000 train / 10,000 test)".into(),
        );
        obj.insert(
            "optimizer".into(),
            "plain SGD (no momentum, no weight decay)".into(),
        );
        obj.insert("order".into(), "shuffled every epoch".into());
        obj.insert("bn_eps".into(), 1e-5.into());
        obj.insert("bn_running_momentum".into(), 0.1.into());
        obj.insert(
            "population_stats".into(),
            "Algorithm 2 over the whole training set, batches of 60".into(),
        );
    }
    Ok(setup_json)
}
