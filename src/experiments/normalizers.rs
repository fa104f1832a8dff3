//! Where batch normalization breaks, and what the normalization family does there
//! (`bnlab reproduce normalizers`): two studies on Fashion-MNIST with `vgg-mini-bn`, its
//! BatchNorms replaced by each normalizer (`--norm`).
//!
//! - **Batch size** (Wu & He 2018, Figure 1; Ioffe 2017's microbatches): batch sizes 32, 16, 8,
//!   4 and 2 for BN, batch renorm, group norm (4 groups), layer norm and no normalization. Every
//!   run sees the same number of examples, with the learning rate scaled linearly with the batch
//!   size (Goyal et al. 2017): `base_lr * B / 32`, decaying 10x over the run. Inference uses the
//!   running statistics (PyTorch's convention).
//! - **Non-i.i.d. batches** (Ioffe 2017, section 4.3): batches of 32 that each hold 2 classes x
//!   16 examples (`Order::Grouped`), for BN, batch renorm and group norm. BN learns the
//!   batch-specific statistics, so its inference accuracy with running statistics falls; for BN
//!   the accuracy with each test batch's own statistics (test batches of 32 in file order, which
//!   mixes the classes) is also reported.
//!
//! Why `vgg-mini-bn`: three 3x3 convolutions (16, 32, 64 channels) with pooling and a linear
//! classifier, about 4 million multiply-adds per example: 28 runs of two epochs each fit in
//! about ten minutes on two cores, and the channel counts divide by the 4 groups of GN.
//! A narrower ResNet-20 would be closer to Wu & He's ResNet-50, at several times the cost.
//!
//! Under `mpirun -n P` (`Study::with_dist`) the runs go one at a time, each trained
//! data-parallel on every rank with global BN sync (batch renorm's r and d from the merged
//! statistics). A run whose batch cannot be split is not trained, and says so: BN and batch
//! renorm need at least 2 examples per process (batches of 2 on 2 processes would leave one),
//! and every normalizer at least one. Such a run is recorded as skipped, with the reason, in
//! results.json and in summary.md's table (`RunResult::skipped`).
//!
//! Every run is independent: they flow through `workers` threads, each network single-threaded
//! and bit-reproducible. The study keeps its progress through `study::Study` like every
//! `reproduce`: finished runs' results and the checkpoints of runs in training, so a stopped
//! study (Ctrl-C, SIGTERM or SIGKILL) continues with `--resume DIR` where it was. results.json holds no timings (they go to timings.json), so a resumed study's
//! results.json is byte-identical to an uninterrupted one's.

use crate::data::Split;
use crate::model::{self, NormChoice};
use crate::network::Network;
use crate::optim::Schedule;
use crate::study::{Study as StudyDir, Tracked};
use crate::train::{Evaluator, Observer, Order, TrainConfig, Trainer};
use crate::{Error, Result};
use std::time::Instant;

/// Settings of the two studies; `default()` is the full run, `quick()` the check of the whole
/// path in a minute or two.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct NormalizersSetup {
    /// The BN network whose BatchNorms are replaced.
    pub model: String,
    /// The batch sizes of the first study, largest first.
    pub batch_sizes: Vec<usize>,
    /// The normalizers of the first study (`--norm` values).
    pub norms: Vec<String>,
    /// The normalizers of the non-i.i.d. study.
    pub non_iid_norms: Vec<String>,
    /// Classes per batch in the non-i.i.d. study.
    pub non_iid_classes: usize,
    /// Batch size of the non-i.i.d. study.
    pub non_iid_batch: usize,
    /// Training examples every run sees.
    pub examples: usize,
    /// The batch size at which the learning rate is `base_lr`.
    pub base_batch: usize,
    /// The learning rate at `base_batch` (scaled linearly with the batch size).
    pub base_lr: f64,
    /// SGD momentum.
    pub momentum: f32,
    /// The learning rate's factor over the whole run (exponential decay).
    pub lr_decay_over_run: f64,
    /// Seed of every run's initialization and batch order.
    pub seed: u64,
    /// Runs trained at once.
    pub workers: usize,
    /// Examples per inference batch (running statistics), and of the BN batch-statistics
    /// evaluation in the non-i.i.d. study it is `non_iid_batch`.
    pub eval_batch: usize,
}

impl Default for NormalizersSetup {
    fn default() -> Self {
        NormalizersSetup {
            model: "vgg-mini-bn".into(),
            batch_sizes: vec![32, 16, 8, 4, 2],
            norms: ["bn", "brn", "gn:4", "ln", "none"]
                .map(String::from)
                .to_vec(),
            non_iid_norms: ["bn", "brn", "gn:4"].map(String::from).to_vec(),
            non_iid_classes: 2,
            non_iid_batch: 32,
            examples: 120_000,
            base_batch: 32,
            base_lr: 0.05,
            momentum: 0.9,
            lr_decay_over_run: 0.1,
            seed: 1,
            workers: 2,
            eval_batch: 500,
        }
    }
}

impl NormalizersSetup {
    /// The whole path in a minute or two: 6,000 examples per run.
    pub fn quick() -> Self {
        NormalizersSetup {
            examples: 6_000,
            ..Self::default()
        }
    }

    /// Refuse settings that cannot run, naming the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, why: String| Err(Error::config(what, why));
        if self.batch_sizes.is_empty() || self.batch_sizes.contains(&0) {
            return bad("batch sizes", "need at least one, each at least 1".into());
        }
        for n in self.norms.iter().chain(&self.non_iid_norms) {
            NormChoice::parse(n)?;
        }
        if self.non_iid_classes == 0 || !self.non_iid_batch.is_multiple_of(self.non_iid_classes) {
            return bad(
                "non-i.i.d. batches",
                format!(
                    "{} classes do not divide batches of {}",
                    self.non_iid_classes, self.non_iid_batch
                ),
            );
        }
        let largest = self
            .batch_sizes
            .iter()
            .copied()
            .chain([self.non_iid_batch])
            .max()
            .unwrap_or(1);
        if self.examples < largest {
            return bad(
                "--examples",
                format!("{} is less than one batch of {largest}", self.examples),
            );
        }
        if self.workers == 0 {
            return bad("workers", "at least 1".into());
        }
        Ok(())
    }

    /// Every run of both studies, in report order.
    pub fn jobs(&self) -> Vec<Job> {
        let mut jobs = Vec::new();
        for n in &self.norms {
            for &b in &self.batch_sizes {
                jobs.push(Job {
                    study: Study::BatchSize,
                    norm: n.clone(),
                    batch_size: b,
                });
            }
        }
        for n in &self.non_iid_norms {
            jobs.push(Job {
                study: Study::NonIid,
                norm: n.clone(),
                batch_size: self.non_iid_batch,
            });
        }
        jobs
    }
}

/// Which of the two studies a run belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Study {
    /// Accuracy against batch size.
    BatchSize,
    /// Batches of a few classes each.
    NonIid,
}

/// One training run.
#[derive(Clone, Debug)]
pub struct Job {
    /// The study.
    pub study: Study,
    /// The `--norm` value.
    pub norm: String,
    /// Examples per batch.
    pub batch_size: usize,
}

impl Job {
    /// A name for files and progress: `batch_size-gn4-8`, `non_iid-bn`.
    pub fn key(&self) -> String {
        let norm = self.norm.replace(':', "");
        match self.study {
            Study::BatchSize => format!("batch_size-{norm}-{}", self.batch_size),
            Study::NonIid => format!("non_iid-{norm}"),
        }
    }
}

/// What a run left.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunResult {
    /// Test accuracy (all 10,000) with the running statistics; `None` after a divergence.
    pub test_accuracy: Option<f64>,
    /// BN only: the same with each test batch normalized by its own statistics.
    pub test_accuracy_batch_stats: Option<f64>,
    /// The step at which training stopped on a NaN or infinite loss or weight.
    pub diverged_at: Option<usize>,
    /// Training steps.
    pub steps: usize,
    /// The learning rate at step 0.
    pub lr: f64,
    /// Wall-clock seconds of training and evaluation (kept out of results.json).
    pub seconds: f64,
    /// Why the run was not trained: a data-parallel study whose batch cannot be split for
    /// this normalizer (see the module doc). `None` for every run of a one-process study.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// Why a run of `net` on batches of `batch` cannot train on `p` processes, if it cannot: BN
/// (and batch renorm) needs at least 2 examples per process, every network at least one.
pub fn data_parallel_skip(net: &Network, batch: usize, p: usize) -> Option<String> {
    let per = if net.has_batch_norm() { 2 } else { 1 };
    (batch < per * p).then(|| {
        format!(
            "skipped: batches of {batch} over {p} processes leave {} example(s) per process, \
             and {} needs at least {per} (run the study without mpirun for this run)",
            batch / p,
            if per == 2 {
                "batch normalization"
            } else {
                "a data-parallel run"
            }
        )
    })
}

/// A finished or resumed run, for progress.
pub struct Done<'a> {
    /// The run.
    pub job: &'a Job,
    /// Its result.
    pub result: &'a RunResult,
    /// Taken from an earlier invocation's output folder.
    pub resumed: bool,
    /// Runs finished so far (this one included), and in all.
    pub finished: usize,
    /// Runs in the study.
    pub total: usize,
}

/// Both studies: every job's result, in `setup.jobs()` order, kept in `study` (the folder's
/// `runs/KEY/result.json`, and the checkpoint of a run in training, every
/// `CHECKPOINT_EVERY` steps and when a stop is requested): finished runs are read back, a
/// stopped run continues from its checkpoint, bit for bit.
///
/// A stop request (the study's `Stop`: Ctrl-C) ends the runs in training after their current
/// step, with their checkpoints written, and starts no new one; the result is then
/// `Error::Stopped`.
pub fn run_study(
    setup: &NormalizersSetup,
    data: &Split,
    study: &StudyDir,
    on_done: &(dyn Fn(Done<'_>) + Sync),
) -> Result<Vec<RunResult>> {
    setup.validate()?;
    let jobs = setup.jobs();
    let keys: Vec<String> = jobs.iter().map(Job::key).collect();
    let order: Vec<usize> = (0..jobs.len()).collect();
    crate::study::run_jobs(
        study,
        "reproduce normalizers",
        &keys,
        &order,
        crate::study::share_cores(setup.workers, jobs.len()).0,
        &|i| run_job(setup, &jobs[i], data, study),
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

/// The runs of the study already finished, in `setup.jobs()` order; `None` for the others.
/// For `--report-only`.
pub fn finished_results(
    setup: &NormalizersSetup,
    study: &StudyDir,
) -> Result<Vec<Option<RunResult>>> {
    setup
        .jobs()
        .iter()
        .map(|j| study.result(&j.key()))
        .collect()
}

/// Training steps between a run's checkpoints.
pub const CHECKPOINT_EVERY: usize = 500;

/// The observer of a run: nothing between steps (the result is the final accuracy); the
/// study's checkpoints carry no data of its own.
struct Quiet;

impl Observer for Quiet {
    fn evaluate(&mut self, _: &mut Network, _: usize, _: f64) -> Result<()> {
        Ok(())
    }
}

impl Tracked for Quiet {
    type Saved = ();
    fn save(&self) {}
    fn restore(&mut self, _: ()) {}
}

/// Train and evaluate one run.
/// Checkpointed in `study` (continued from its checkpoint if it has one); a stop request ends
/// it after its current step with `Error::Stopped`.
pub fn run_job(
    setup: &NormalizersSetup,
    job: &Job,
    data: &Split,
    study: &StudyDir,
) -> Result<RunResult> {
    let t0 = Instant::now();
    let choice = NormChoice::parse(&job.norm)?;
    let spec = model::apply_norm(&model::preset(&setup.model)?, choice)?;
    let shape = data.train.shape();
    let input = model::resolve_input(&spec, Some(&shape))?;
    let b = job.batch_size;
    let threads = crate::study::share_cores(setup.workers, setup.jobs().len()).1;
    let mut net = Network::build(&spec, &input, setup.seed, b.max(setup.eval_batch), threads)?;
    let steps = (setup.examples / b).max(1);
    let lr = setup.base_lr * b as f64 / setup.base_batch as f64;
    let config = TrainConfig {
        steps,
        batch_size: b,
        lr,
        momentum: setup.momentum,
        weight_decay: 0.0,
        schedule: Schedule::Exponential {
            every: steps,
            gamma: setup.lr_decay_over_run,
        },
        seed: setup.seed,
        order: match job.study {
            Study::BatchSize => Order::Shuffle,
            Study::NonIid => Order::Grouped {
                classes: setup.non_iid_classes,
            },
        },
        eval_every: 0,
        threads,
        augment: crate::train::Augment::None,
        bn: Default::default(),
    };
    config.validate(net.has_batch_norm())?;
    if let Some(d) = study.dist() {
        if let Some(why) = data_parallel_skip(&net, b, d.comm.size()) {
            return Ok(RunResult {
                test_accuracy: None,
                test_accuracy_batch_stats: None,
                diverged_at: None,
                steps,
                lr,
                seconds: 0.0,
                skipped: Some(why),
            });
        }
        net.set_dist(Some(d.clone()))?;
        net.check_split(b)?;
    }
    let features = data.train.features();
    let mut trainer = Trainer::new(config, data.train.len(), features);
    let key = job.key();
    let mut quiet = Quiet;
    let mut loss = study
        .resume_run(&key, &mut net, &mut trainer, &mut quiet)?
        .unwrap_or_default();
    let diverged_at = match study.train_run(
        &key,
        &mut net,
        &mut trainer,
        &data.train,
        steps,
        0,
        CHECKPOINT_EVERY,
        &mut loss,
        &mut quiet,
    ) {
        Ok(()) => None,
        Err(Error::Diverged { step, .. }) => Some(step),
        Err(e) => return Err(e),
    };
    let (test_accuracy, test_accuracy_batch_stats) = if diverged_at.is_none() {
        let acc = Evaluator::new(setup.eval_batch, features)
            .evaluate(&mut net, &data.test, None, None)?
            .accuracy();
        let batch = (matches!(choice, NormChoice::Bn) && job.study == Study::NonIid)
            .then(|| {
                Evaluator::new(setup.non_iid_batch, features)
                    .with_batch_statistics()
                    .evaluate(&mut net, &data.test, None, None)
                    .map(|e| e.accuracy())
            })
            .transpose()?;
        (Some(acc), batch)
    } else {
        (None, None)
    };
    Ok(RunResult {
        test_accuracy,
        test_accuracy_batch_stats,
        diverged_at,
        steps,
        lr,
        seconds: t0.elapsed().as_secs_f64(),
        skipped: None,
    })
}

/// The normalizer key of results.json (`bn`, `brn`, `gn`, `ln`, `none`) for a `--norm` value.
pub fn norm_key(norm: &str) -> String {
    NormChoice::parse(norm)
        .map(|c| c.key().to_string())
        .unwrap_or_else(|_| norm.to_string())
}
