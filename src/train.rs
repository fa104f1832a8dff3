//! Training and evaluation: mini-batch order, the training step (forward, loss, backward, SGD),
//! divergence checks, evaluation with a probe on one unit's input, and the paper's Algorithm 2.
//!
//! Buffers (the batch's pixels and labels, the probe's values) are sized once per run; the step
//! itself allocates nothing.

use crate::data::{CropFlip, Dataset};
use crate::kernels::join;
use crate::network::Network;
use crate::nn::{InferenceStats, Layer, Mode, RenormSchedule};
use crate::optim::{Schedule, Sgd};
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How training examples are grouped into mini-batches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// A fresh random permutation every epoch; a tail shorter than a batch is skipped.
    Shuffle,
    /// Batch k holds examples k*B .. (k+1)*B-1 in file order, wrapping around at the end.
    Sequential,
    /// Non-i.i.d. batches (Ioffe 2017, section 4.3): every batch is `classes` pieces of
    /// B / `classes` examples, each piece of one class (so a batch holds at most `classes`
    /// classes), the pieces in random order, reshuffled every epoch. Examples left over from
    /// the pieces wait for a later epoch.
    Grouped {
        /// Pieces (classes) per batch; must divide the batch size.
        classes: usize,
    },
}

impl Order {
    /// Parse `shuffle`, `sequential` or `grouped:K` (`--order`).
    pub fn parse(s: &str) -> Result<Order> {
        let bad = || {
            Error::config(
                "--order",
                format!("'{s}' (expected shuffle, sequential or grouped:K with K >= 1)"),
            )
        };
        match s {
            "shuffle" => Ok(Order::Shuffle),
            "sequential" => Ok(Order::Sequential),
            _ => match s.strip_prefix("grouped:").map(str::parse::<usize>) {
                Some(Ok(classes)) if classes >= 1 => Ok(Order::Grouped { classes }),
                _ => Err(bad()),
            },
        }
    }
}

/// Yields the example indices of successive mini-batches.
pub struct Batches {
    order: Order,
    n: usize,
    batch: usize,
    perm: Vec<usize>,
    pos: usize,
    rng: ChaCha8Rng,
    indices: Vec<usize>,
    /// `Order::Grouped`'s labels and workspace, set up at the first batch.
    groups: Option<Grouping>,
}

/// The workspace of `Order::Grouped`, sized once.
struct Grouping {
    labels: Vec<u8>,
    /// Each class's examples.
    by_class: Vec<Vec<usize>>,
    /// (class, first index in `by_class[class]`) of every piece.
    pieces: Vec<(usize, usize)>,
    /// Examples per piece.
    piece: usize,
    /// The batches' part of a permutation: whole batches of pieces.
    usable: usize,
}

impl Batches {
    /// Batches of `batch` examples out of `n`, in `order`; the shuffles come from `seed`.
    pub fn new(order: Order, n: usize, batch: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_0bde_0000_0001);
        let mut perm: Vec<usize> = (0..n).collect();
        if order == Order::Shuffle {
            perm.shuffle(&mut rng);
        }
        Batches {
            order,
            n,
            batch,
            perm,
            pos: 0,
            rng,
            indices: vec![0; batch],
            groups: None,
        }
    }

    /// `Order::Grouped` needs the labels: set them up (once; later calls do nothing). The
    /// first epoch's permutation is drawn here unless a restored state is being continued.
    pub fn set_labels(&mut self, labels: &[u8]) -> Result<()> {
        let Order::Grouped { classes } = self.order else {
            return Ok(());
        };
        if self.groups.is_some() {
            return Ok(());
        }
        if classes == 0 || !self.batch.is_multiple_of(classes) {
            return Err(Error::config(
                "--order",
                format!(
                    "grouped:{classes} needs a batch size divisible by {classes}, not {}",
                    self.batch
                ),
            ));
        }
        if labels.len() != self.n {
            return Err(Error::config(
                "--order",
                format!("{} labels for {} examples", labels.len(), self.n),
            ));
        }
        let piece = self.batch / classes;
        let k = labels.iter().map(|&l| l as usize + 1).max().unwrap_or(0);
        let mut counts = vec![0usize; k];
        for &l in labels {
            counts[l as usize] += 1;
        }
        let pieces: usize = counts.iter().map(|c| c / piece).sum();
        let usable = pieces / classes * classes * piece;
        if usable == 0 {
            return Err(Error::config(
                "--order",
                format!(
                    "grouped:{classes} with batches of {}: no class has {piece} examples for a piece",
                    self.batch
                ),
            ));
        }
        let mut g = Grouping {
            labels: labels.to_vec(),
            by_class: counts.iter().map(|&c| Vec::with_capacity(c)).collect(),
            pieces: Vec::with_capacity(pieces),
            piece,
            usable,
        };
        if self.pos == 0 {
            regroup(&mut g, &mut self.perm, &mut self.rng);
        }
        self.groups = Some(g);
        Ok(())
    }

    /// Everything the following batches depend on: the current permutation, the position in
    /// it, and the shuffling generator's seed and stream position.
    pub fn state(&self) -> (&[usize], usize, [u8; 32], u128) {
        (
            &self.perm,
            self.pos,
            self.rng.get_seed(),
            self.rng.get_word_pos(),
        )
    }

    /// Continue from a `state()`; refuses one that does not fit this data set.
    pub fn restore(
        &mut self,
        perm: Vec<usize>,
        pos: usize,
        seed: [u8; 32],
        word_pos: u128,
    ) -> Result<()> {
        let mut seen = vec![false; self.n];
        let is_permutation = perm.len() == self.n
            && perm
                .iter()
                .all(|&i| i < self.n && !std::mem::replace(&mut seen[i], true));
        if !is_permutation || pos > self.n {
            return Err(Error::config(
                "run state",
                format!(
                    "the saved batch order does not fit a data set of {} examples",
                    self.n
                ),
            ));
        }
        self.perm = perm;
        self.pos = pos;
        self.rng = ChaCha8Rng::from_seed(seed);
        self.rng.set_word_pos(word_pos);
        Ok(())
    }

    /// The indices of the next mini-batch.
    pub fn next_batch(&mut self) -> &[usize] {
        match self.order {
            Order::Sequential => {
                for (j, ix) in self.indices.iter_mut().enumerate() {
                    *ix = (self.pos + j) % self.n;
                }
                self.pos = (self.pos + self.batch) % self.n;
            }
            Order::Shuffle => {
                if self.pos + self.batch > self.n {
                    self.perm.shuffle(&mut self.rng);
                    self.pos = 0;
                }
                self.indices
                    .copy_from_slice(&self.perm[self.pos..self.pos + self.batch]);
                self.pos += self.batch;
            }
            Order::Grouped { .. } => {
                let g = self
                    .groups
                    .as_mut()
                    .expect("Batches::set_labels before the first grouped batch");
                if self.pos + self.batch > g.usable {
                    regroup(g, &mut self.perm, &mut self.rng);
                    self.pos = 0;
                }
                self.indices
                    .copy_from_slice(&self.perm[self.pos..self.pos + self.batch]);
                self.pos += self.batch;
            }
        }
        &self.indices
    }
}

/// A new epoch of `Order::Grouped`: every class's examples shuffled and cut into pieces, the
/// pieces shuffled and laid out one after another, the examples left over at the end (so that
/// `perm` stays a permutation). No allocation: the buffers were sized in `set_labels`.
fn regroup(g: &mut Grouping, perm: &mut [usize], rng: &mut ChaCha8Rng) {
    for v in &mut g.by_class {
        v.clear();
    }
    for (i, &l) in g.labels.iter().enumerate() {
        g.by_class[l as usize].push(i);
    }
    g.pieces.clear();
    for (c, v) in g.by_class.iter_mut().enumerate() {
        v.shuffle(rng);
        for p in 0..v.len() / g.piece {
            g.pieces.push((c, p * g.piece));
        }
    }
    g.pieces.shuffle(rng);
    let mut at = 0;
    for &(c, start) in &g.pieces {
        perm[at..at + g.piece].copy_from_slice(&g.by_class[c][start..start + g.piece]);
        at += g.piece;
    }
    // The leftovers: each class's tail past its last piece, then pieces beyond `usable`.
    for v in &g.by_class {
        let tail = v.len() / g.piece * g.piece;
        perm[at..at + v.len() - tail].copy_from_slice(&v[tail..]);
        at += v.len() - tail;
    }
    debug_assert_eq!(at, perm.len());
}

/// Settings of a training run.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainConfig {
    /// Training steps (mini-batches) in all.
    pub steps: usize,
    /// Examples per mini-batch.
    pub batch_size: usize,
    /// The base learning rate.
    pub lr: f64,
    /// SGD momentum in `[0, 1)`.
    pub momentum: f32,
    /// L2 weight decay, on every parameter.
    pub weight_decay: f32,
    /// How the learning rate changes with the step.
    pub schedule: Schedule,
    /// Seed of the batch order (and of the augmentation).
    pub seed: u64,
    /// How examples are grouped into mini-batches.
    pub order: Order,
    /// Evaluate every this many steps (0: only at the end).
    pub eval_every: usize,
    /// Most threads a kernel may use (1 or 2).
    pub threads: usize,
    /// Augmentation of training batches.
    #[serde(default)]
    pub augment: Augment,
    /// What the batch-normalization layers do in training beyond Algorithm 1: frozen, and
    /// batch renormalization's schedule.
    #[serde(default)]
    pub bn: BnTraining,
}

/// Training settings of the batch-normalization layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BnTraining {
    /// Frozen BN (`--freeze-bn`): every BatchNorm normalizes with fixed inference statistics
    /// in training too, as in fine-tuning; `None`: batch statistics.
    #[serde(default)]
    pub freeze: Option<FreezeBn>,
    /// How batch renormalization's limits relax over the run (layers without renorm ignore
    /// it).
    #[serde(default)]
    pub renorm_schedule: RenormSchedule,
}

/// Which statistics frozen BN uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum FreezeBn {
    /// The running statistics the network starts with (from `--init`).
    Running,
    /// Algorithm 2's population statistics of the starting weights, computed before the
    /// first step and kept in the running-statistics buffers (so checkpoints carry them).
    Population,
}

impl FreezeBn {
    /// Parse `running` or `population`.
    pub fn parse(s: &str) -> Result<FreezeBn> {
        match s {
            "running" => Ok(FreezeBn::Running),
            "population" => Ok(FreezeBn::Population),
            _ => Err(Error::config(
                "--freeze-bn",
                format!("'{s}' (expected running or population)"),
            )),
        }
    }
}

impl TrainConfig {
    /// Reject a batch larger than the training set (`train_len` examples).
    pub fn validate_for_data(&self, train_len: usize) -> Result<()> {
        if self.batch_size > train_len {
            return Err(Error::config(
                "--batch-size",
                format!(
                    "{} is larger than the training set ({train_len} examples)",
                    self.batch_size
                ),
            ));
        }
        Ok(())
    }

    /// Reject settings that make no sense, naming the flag.
    pub fn validate(&self, has_batch_norm: bool) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::config("--batch-size", "must be at least 1"));
        }
        if has_batch_norm && self.batch_size < 2 {
            return Err(Error::config(
                "--batch-size",
                "a batch-normalized network needs at least 2 examples per mini-batch \
                 (its statistics are undefined for 1)",
            ));
        }
        if !self.lr.is_finite() || self.lr < 0.0 {
            return Err(Error::config(
                "--lr",
                format!("{} (must be finite and >= 0)", self.lr),
            ));
        }
        if !self.momentum.is_finite() || !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::config(
                "--momentum",
                format!("{} (must be in [0, 1))", self.momentum),
            ));
        }
        if !self.weight_decay.is_finite() || self.weight_decay < 0.0 {
            return Err(Error::config(
                "--weight-decay",
                format!("{} (must be finite and >= 0)", self.weight_decay),
            ));
        }
        if self.threads == 0 {
            return Err(Error::config("--threads", "must be at least 1"));
        }
        Ok(())
    }
}

/// What `Evaluator::for_each_batch` calls per batch: the network after its forward pass, the
/// batch's first example index, its size, and its labels.
pub type InferenceBatch<'a> = dyn FnMut(&Network, usize, usize, &[usize]) -> Result<()> + 'a;

/// One evaluation on a data set.
#[derive(Clone, Debug, Default)]
pub struct Evaluation {
    /// Examples classified correctly.
    pub correct: usize,
    /// Examples evaluated.
    pub total: usize,
    /// Mean cross-entropy loss.
    pub loss: f64,
    /// Values of the probed unit's input, one per example, when a probe was asked for.
    pub probe: Vec<f32>,
}

impl Evaluation {
    /// `correct / total`, in 0..1 (0 for no examples).
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Which unit's input to record during evaluation: the output of `layer` (of the network's
/// `Sequential` body), feature `unit`.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    /// The index of the layer of `Network::body` whose output is recorded.
    pub layer: usize,
    /// The feature of that output.
    pub unit: usize,
}

/// Buffers for evaluating in batches, sized once.
pub struct Evaluator {
    batch: usize,
    mode: Mode,
    x: Vec<f32>,
    y: Vec<usize>,
    indices: Vec<usize>,
}

impl Evaluator {
    /// Buffers for batches of up to `batch` examples of `features` values.
    pub fn new(batch: usize, features: usize) -> Self {
        Evaluator {
            batch,
            mode: Mode::Eval,
            x: vec![0.0; batch * features],
            y: vec![0; batch],
            indices: vec![0; batch],
        }
    }

    /// Normalize every batch with its own statistics instead of the inference statistics
    /// (BN as in training, but nothing is updated and dropout is off): the diagnosis for a
    /// network whose running statistics do not describe its last weights.
    pub fn with_batch_statistics(mut self) -> Self {
        self.mode = Mode::Population;
        self
    }

    /// The one inference loop: examples `0..limit` of `data` (all without a limit) in file
    /// order, in batches of at most this evaluator's batch and the network's largest, forward
    /// in inference mode (or with batch statistics, see `with_batch_statistics`); `f` gets the network (its last logits, `n x classes`, and every
    /// layer's output), the first example's index, the batch size and the labels.
    pub fn for_each_batch(
        &mut self,
        net: &mut Network,
        data: &Dataset,
        limit: Option<usize>,
        f: &mut InferenceBatch<'_>,
    ) -> Result<()> {
        let total = limit.unwrap_or(data.len()).min(data.len());
        self.for_each_batch_in(net, data, 0..total, f)
    }

    /// `for_each_batch` over the examples `range`.
    pub fn for_each_batch_in(
        &mut self,
        net: &mut Network,
        data: &Dataset,
        range: std::ops::Range<usize>,
        f: &mut InferenceBatch<'_>,
    ) -> Result<()> {
        let (mut start, total) = (range.start, range.end);
        while start < total {
            let n = self.batch.min(total - start).min(net.max_batch());
            for (j, ix) in self.indices[..n].iter_mut().enumerate() {
                *ix = start + j;
            }
            data.fill_batch(&self.indices[..n], &mut self.x, &mut self.y);
            net.forward(&self.x, n, self.mode)?;
            f(net, start, n, &self.y[..n])?;
            start += n;
        }
        Ok(())
    }

    /// Test accuracy and mean loss over `data` (the first `limit` examples if given), in
    /// inference mode, recording the probe's values if asked. In a data-parallel run each rank
    /// evaluates a contiguous shard and the counts and losses are summed over the ranks (the
    /// probe's values gathered, every rank getting all of them in example order); with batch
    /// statistics (`with_batch_statistics`) the shards are whole batches, each normalized on
    /// its own rank by its own statistics, so that the batches are one process's.
    pub fn evaluate(
        &mut self,
        net: &mut Network,
        data: &Dataset,
        probe: Option<Probe>,
        limit: Option<usize>,
    ) -> Result<Evaluation> {
        let total = limit.unwrap_or(data.len()).min(data.len());
        let k = net.classes();
        let mut ev = Evaluation {
            total,
            ..Default::default()
        };
        if probe.is_some() {
            ev.probe.reserve_exact(total);
        }
        let dist = net.dist().cloned();
        let shard = match &dist {
            // With batch statistics, whole batches per rank: the batches one process
            // normalizes, each on one rank (the last one, shorter, on the last rank).
            Some(d) if self.mode == Mode::Population => {
                let b = self.batch.min(net.max_batch()).max(1);
                let s = crate::dist::slice_of(total.div_ceil(b), d.comm.size(), d.comm.rank());
                (s.start * b).min(total)..(s.end * b).min(total)
            }
            Some(d) => crate::dist::slice_of(total, d.comm.size(), d.comm.rank()),
            None => 0..total,
        };
        let mut loss_sum = 0.0;
        self.for_each_batch_in(net, data, shard.clone(), &mut |net, _, n, labels| {
            let logits = net.last_logits(n);
            for (row, &label) in logits.chunks_exact(k).zip(labels) {
                if argmax(row) == label {
                    ev.correct += 1;
                }
            }
            loss_sum += net.loss_of_last(labels, n) * n as f64;
            if let Some(p) = probe {
                let out = net.body.output_of(p.layer);
                let width = out.len() / net.max_batch();
                for i in 0..n {
                    ev.probe.push(out[i * width + p.unit]);
                }
            }
            Ok(())
        })?;
        if let Some(d) = dist {
            let mut sums = [ev.correct as f64, loss_sum];
            d.comm.sum_f64(&mut sums);
            ev.correct = sums[0] as usize;
            loss_sum = sums[1];
            if probe.is_some() {
                // Gather the shards' values in example order: each rank puts its own at its
                // shard's place among zeros and the ranks sum (adding zeros is exact).
                let mut all = vec![0.0f32; total];
                all[shard].copy_from_slice(&ev.probe);
                d.comm.sum_f32(&mut all);
                ev.probe = all;
            }
        }
        ev.loss = loss_sum / total.max(1) as f64;
        Ok(ev)
    }
}

/// The predicted class (argmax of the logits) of every example of `data`, in inference mode,
/// in batches of at most the network's largest batch.
pub fn predictions(net: &mut Network, data: &Dataset) -> Result<Vec<usize>> {
    let batch = net.max_batch().min(data.len()).max(1);
    let k = net.classes();
    let mut out = Vec::with_capacity(data.len());
    Evaluator::new(batch, data.features()).for_each_batch(
        net,
        data,
        None,
        &mut |net, _, n, _| {
            out.extend(net.last_logits(n).chunks_exact(k).map(argmax));
            Ok(())
        },
    )?;
    Ok(out)
}

/// Index of the largest value (the first one on ties, as `torch.argmax`).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (j, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = j;
        }
    }
    best
}

/// The `q`-th percentile (0..=100) with linear interpolation between order statistics, as
/// numpy's default. Sorts `values` in place.
pub fn percentile(values: &mut [f32], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let pos = q / 100.0 * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let t = pos - lo as f64;
    values[lo] as f64 * (1.0 - t) + values[hi] as f64 * t
}

/// The batch buffer's start, shared by the two threads that fill disjoint column ranges of
/// its rows (see `Trainer::step`).
#[derive(Clone, Copy)]
struct RowsPtr(*mut f32);
// SAFETY: the pointer is only turned into slices that do not overlap between the threads
// holding it (each thread's own column range of each row), and the threads are joined before
// the buffer is used again through its owner.
unsafe impl Send for RowsPtr {}
unsafe impl Sync for RowsPtr {}

impl RowsPtr {
    /// Columns `cols` of row `row` of a buffer `width` wide.
    ///
    /// # Safety
    /// `(row + 1) * width` must be within the buffer, `cols.end <= width`, and no other live
    /// reference may cover these elements: each caller owns its own column range.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row_part(
        &self,
        row: usize,
        width: usize,
        cols: &std::ops::Range<usize>,
    ) -> &mut [f32] {
        std::slice::from_raw_parts_mut(self.0.add(row * width + cols.start), cols.len())
    }
}

/// Data augmentation applied to each training batch after it is filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// None.
    #[default]
    None,
    /// A random crop of each image zero-padded by 4 pixels, and a horizontal flip with
    /// probability 1/2 (the standard CIFAR recipe).
    CropFlip,
}

impl Augment {
    /// `none` or `crop-flip`.
    pub fn parse(s: &str) -> Result<Augment> {
        match s {
            "none" => Ok(Augment::None),
            "crop-flip" => Ok(Augment::CropFlip),
            _ => Err(Error::config(
                "--augment",
                format!("'{s}' (expected none or crop-flip)"),
            )),
        }
    }
}

/// The state of a training run between steps.
pub struct Trainer {
    /// The settings.
    pub config: TrainConfig,
    /// The optimizer, with its momentum buffers.
    pub sgd: Sgd,
    /// The order of the training examples.
    pub batches: Batches,
    /// Steps done so far.
    pub step: usize,
    x: Vec<f32>,
    y: Vec<usize>,
    /// Crop-flip with its own generator (seeded from the run's seed), when asked for.
    augment: Option<(CropFlip, ChaCha8Rng)>,
    /// A data-parallel step's gradients, every parameter's one after another, summed over the
    /// ranks (sized at the first such step).
    grads: Vec<f32>,
    /// Chooses the network's thread count step by step, when the user left it to bnlab
    /// (`tune_threads`).
    tuner: Option<crate::tune::ThreadTuner>,
}

impl Trainer {
    /// A trainer for a training set of `train_len` examples of `features` values each, with
    /// its batch buffers sized for `config.batch_size`. The network it steps must be built for
    /// batches at least that large (`Network::build`'s `max_batch`).
    pub fn new(config: TrainConfig, train_len: usize, features: usize) -> Self {
        let sgd = Sgd::new(
            config.lr,
            config.momentum,
            config.weight_decay,
            config.schedule,
        );
        let batches = Batches::new(config.order, train_len, config.batch_size, config.seed);
        let b = config.batch_size;
        Trainer {
            config,
            sgd,
            batches,
            step: 0,
            x: vec![0.0; b * features],
            y: vec![0; b],
            augment: None,
            grads: Vec::new(),
            tuner: None,
        }
    }

    /// Let the steps choose their thread count among `1..=max` as they run
    /// (`tune::ThreadTuner`): for runs whose user did not fix it. Results do not change.
    pub fn tune_threads(&mut self, max: usize) {
        self.tuner = (max > 1).then(|| crate::tune::ThreadTuner::new(max));
    }

    /// Choose the thread count with `tuner` (see `tune_threads`; tests pass
    /// `ThreadTuner::cycling`).
    pub fn set_tuner(&mut self, tuner: crate::tune::ThreadTuner) {
        self.tuner = Some(tuner);
    }

    /// The thread tuner, when the steps choose their thread count.
    pub fn tuner(&self) -> Option<&crate::tune::ThreadTuner> {
        self.tuner.as_ref()
    }

    /// The thread tuner, mutable (to reset its counts).
    pub fn tuner_mut(&mut self) -> Option<&mut crate::tune::ThreadTuner> {
        self.tuner.as_mut()
    }

    /// Set up the configured augmentation for examples of `shape` (`[C, H, W]`); a no-op for
    /// `Augment::None`.
    pub fn prepare_augmentation(&mut self, shape: [usize; 3]) -> Result<()> {
        if self.config.augment == Augment::CropFlip {
            let rng = ChaCha8Rng::seed_from_u64(self.config.seed ^ 0xa06_0e47_0000_0002);
            self.augment = Some((CropFlip::new(shape, 4)?, rng));
        }
        Ok(())
    }

    /// The augmentation generator's seed and stream position, for run checkpoints.
    pub fn augment_rng_state(&self) -> Option<([u8; 32], u128)> {
        self.augment
            .as_ref()
            .map(|(_, r)| (r.get_seed(), r.get_word_pos()))
    }

    /// Continue the augmentation generator from `augment_rng_state`.
    pub fn restore_augment_rng(&mut self, seed: [u8; 32], word_pos: u128) {
        if let Some((_, r)) = &mut self.augment {
            *r = ChaCha8Rng::from_seed(seed);
            r.set_word_pos(word_pos);
        }
    }

    /// One SGD step on the next mini-batch; returns the loss. A NaN or infinite loss stops
    /// training with `Error::Diverged` before the weights are touched.
    pub fn step(&mut self, net: &mut Network, data: &Dataset) -> Result<f64> {
        let Some(threads) = self.tuner.as_ref().map(|t| t.threads()) else {
            return self.step_on(net, data);
        };
        net.threads = threads;
        let t = std::time::Instant::now();
        let loss = self.step_on(net, data);
        if let Some(tuner) = &mut self.tuner {
            tuner.record(t.elapsed().as_secs_f64());
        }
        loss
    }

    /// `step` on the network's current thread count.
    fn step_on(&mut self, net: &mut Network, data: &Dataset) -> Result<f64> {
        if net.dist().is_some() {
            return self.step_data_parallel(net, data);
        }
        let b = self.config.batch_size;
        self.batches.set_labels(&data.labels)?;
        let idx = self.batches.next_batch();
        if net.threads > 1 && self.augment.is_none() {
            // Each thread converts the half of every image that its half of the input layer
            // reads (see `kernels::sparse`), so the pixels stay in that core's cache.
            let f = data.features();
            assert!(idx.len() * f <= self.x.len(), "batch buffer too small");
            let x = RowsPtr(self.x.as_mut_ptr());
            let fill = |cols: std::ops::Range<usize>| {
                for (row, &i) in idx.iter().enumerate() {
                    if let Some(&ahead) = idx.get(row + crate::data::dataset::PREFETCH_ROWS) {
                        data.prefetch_row(ahead, cols.clone());
                    }
                    // SAFETY: rows are within the buffer (checked above); this closure alone
                    // touches columns `cols` of each row, the other closure the rest, and
                    // `join` returns only when both are done.
                    data.fill_row(i, cols.clone(), unsafe { x.row_part(row, f, &cols) });
                }
            };
            join(2, || fill(0..f / 2), || fill(f / 2..f));
            for (y, &i) in self.y.iter_mut().zip(idx) {
                *y = data.labels[i] as usize;
            }
        } else {
            data.fill_batch(idx, &mut self.x, &mut self.y);
        }
        if let Some((aug, rng)) = &mut self.augment {
            aug.apply(&mut self.x, b, rng);
        }
        let (step, steps) = (self.step, self.config.steps);
        let bn = self.config.bn;
        net.for_each_batch_norm(&mut |layer| {
            layer.frozen = bn.freeze.is_some();
            if let Some(end) = layer.renorm() {
                layer.set_renorm_limits(bn.renorm_schedule.limits(end, step, steps));
            }
        });
        let loss = net.forward_backward(&self.x, &self.y, b)?;
        self.step += 1;
        if !loss.is_finite() {
            return Err(Error::Diverged {
                step: self.step,
                msg: format!("the loss is {loss}"),
            });
        }
        if !self.sgd.step(net) {
            return Err(Error::Diverged {
                step: self.step,
                msg: "a weight became NaN or infinite".into(),
            });
        }
        Ok(loss)
    }
}

impl Trainer {
    /// `step` as one rank of a data-parallel run: the same global batch on every rank (same
    /// order, same generator), this rank's contiguous slice of it forward and backward with
    /// the gradient of the global batch's mean loss, the gradients and the loss summed over
    /// the ranks, and the same SGD update everywhere.
    fn step_data_parallel(&mut self, net: &mut Network, data: &Dataset) -> Result<f64> {
        let dist = net.dist().cloned().expect("a data-parallel network");
        let b = self.config.batch_size;
        self.batches.set_labels(&data.labels)?;
        let slice = dist.slice(b);
        let (slice_start, n) = (slice.start, slice.len());
        let idx = &self.batches.next_batch()[slice];
        data.fill_batch(idx, &mut self.x, &mut self.y);
        if let Some((aug, rng)) = &mut self.augment {
            // One draw per example of the global batch, as in one process: skip the other
            // ranks' draws, so every rank's generator stays where one process's would be.
            let skip = |rng: &mut ChaCha8Rng, k: usize| (0..k).for_each(|_| _ = rng.next_u64());
            skip(rng, slice_start);
            aug.apply(&mut self.x, n, rng);
            skip(rng, b - slice_start - n);
        }
        let (step, steps) = (self.step, self.config.steps);
        let bn = self.config.bn;
        net.for_each_batch_norm(&mut |layer| {
            layer.frozen = bn.freeze.is_some();
            if let Some(end) = layer.renorm() {
                layer.set_renorm_limits(bn.renorm_schedule.limits(end, step, steps));
            }
        });
        let local_loss = net.forward_backward_of(&self.x, &self.y, n, b)?;
        if self.grads.is_empty() {
            let mut len = 0;
            net.body.for_each_param(&mut |w, _| len += w.len());
            self.grads = vec![0.0; len];
        }
        let mut at = 0;
        let grads = &mut self.grads;
        net.body.for_each_param(&mut |_, g| {
            grads[at..at + g.len()].copy_from_slice(g);
            at += g.len();
        });
        dist.comm.sum_f32(&mut self.grads);
        let mut loss = [local_loss * n as f64];
        dist.comm.sum_f64(&mut loss);
        let loss = loss[0] / b as f64;
        self.step += 1;
        // Every rank holds the same loss and weights, so every rank decides the same.
        if !loss.is_finite() {
            return Err(Error::Diverged {
                step: self.step,
                msg: format!("the loss is {loss}"),
            });
        }
        if !self.sgd.step_with(net, Some(&self.grads)) {
            return Err(Error::Diverged {
                step: self.step,
                msg: "a weight became NaN or infinite".into(),
            });
        }
        Ok(loss)
    }
}

/// The paper's Algorithm 2 (lines 8-11): with the network frozen, run training mini-batches of
/// `batch` examples in file order (`max_batches` of them, by default the whole training set)
/// and set each BN layer's population statistics to `E[x] = E_B[mu_B]` and
/// `Var[x] = m/(m-1) E_B[sigma2_B]`. Layers are processed in one pass: each BN sees its input as
/// it was during training (every BN below it normalizing with mini-batch statistics).
/// Leaves the network using population statistics for inference. Returns the batch count.
pub fn population_statistics(
    net: &mut Network,
    train: &Dataset,
    batch: usize,
    max_batches: Option<usize>,
) -> Result<usize> {
    population_statistics_or_stop(net, train, batch, max_batches, &mut || false)
}

/// [`population_statistics`], asking `stop` before each mini-batch: when it answers true, the
/// pass ends with `Error::Stopped { step: 0 }` and the network is left with no population
/// statistics at all. In a data-parallel run `stop` is called on
/// every rank the same number of times, so it may be a collective (a stop agreed over them).
pub fn population_statistics_or_stop(
    net: &mut Network,
    train: &Dataset,
    batch: usize,
    max_batches: Option<usize>,
    stop: &mut dyn FnMut() -> bool,
) -> Result<usize> {
    if !net.has_batch_norm() {
        return Ok(0);
    }
    let batch = batch.min(net.max_batch());
    if batch < 2 {
        return Err(Error::config(
            "batch size",
            "Algorithm 2 needs mini-batches of at least 2 examples",
        ));
    }
    let count = (train.len() / batch).min(max_batches.unwrap_or(usize::MAX));
    if count == 0 {
        return Err(Error::config(
            "population batch size",
            format!(
                "Algorithm 2 needs at least one mini-batch of {batch} training examples; the training set has {}",
                train.len()
            ),
        ));
    }
    let features = train.features();
    // A data-parallel run: each rank its slice of every batch, as in training (the BN layers
    // merge or sum the statistics over the ranks).
    let slice = net.dist().map_or(0..batch, |d| d.slice(batch));
    let mut x = vec![0.0; batch * features];
    let mut y = vec![0; batch];
    let mut indices = vec![0; slice.len()];
    net.for_each_batch_norm(&mut |bn| bn.begin_population());
    for b in 0..count {
        if stop() {
            abandon_population(net);
            return Err(Error::Stopped { step: 0 });
        }
        for (j, ix) in indices.iter_mut().enumerate() {
            *ix = b * batch + slice.start + j;
        }
        train.fill_batch(&indices, &mut x, &mut y);
        net.forward_of(&x, slice.len(), batch, Mode::Population)?;
    }
    let mut missing = 0;
    net.for_each_batch_norm(&mut |bn| {
        bn.finish_population();
        missing += usize::from(bn.population_mean.is_none());
    });
    if missing > 0 {
        // Never fall back to the running averages in silence.
        return Err(Error::config(
            "population statistics",
            format!("Algorithm 2 could not compute the statistics of {missing} BatchNorm layer(s)"),
        ));
    }
    net.set_inference_stats(InferenceStats::Population);
    Ok(count)
}

/// End an Algorithm 2 pass early: every BN layer's accumulation is dropped and its population
/// statistics cleared, so nothing half-computed is left behind.
pub fn abandon_population(net: &mut Network) {
    net.for_each_batch_norm(&mut |bn| bn.abandon_population());
}

/// The gradient of one parameter, under its `state_dict` name and in PyTorch's layout.
#[derive(Clone, Debug)]
pub struct NamedGrad {
    /// The parameter's `state_dict` name (`0.weight`).
    pub name: String,
    /// Its shape in PyTorch's layout.
    pub shape: Vec<usize>,
    /// The gradient, row-major in that shape.
    pub values: Vec<f32>,
}

/// The mean cross-entropy loss and the gradient of every parameter for one mini-batch: training
/// examples `offset .. offset + batch` in file order, in training mode (batch statistics).
/// Nothing else changes: BN's running statistics and counters are put back as they were.
pub fn gradients(
    net: &mut Network,
    data: &Dataset,
    offset: usize,
    batch: usize,
) -> Result<(f64, Vec<NamedGrad>)> {
    if batch == 0 || batch > net.max_batch() {
        return Err(Error::config(
            "--batch-size",
            format!("{batch} (must be 1..={})", net.max_batch()),
        ));
    }
    if offset >= data.len() || data.len() - offset < batch {
        return Err(Error::config(
            "--offset",
            format!(
                "examples {offset}..{} do not exist: the training set has {} examples",
                offset + batch,
                data.len()
            ),
        ));
    }
    if net.has_batch_norm() && batch < 2 {
        return Err(Error::config(
            "--batch-size",
            "a batch-normalized network needs at least 2 examples per mini-batch",
        ));
    }
    // Every tensor of the state, to put the buffers back afterwards.
    let mut saved: Vec<(Vec<f32>, i64)> = Vec::new();
    net.visit_state(&mut |_, _, t| match t {
        crate::nn::TensorMut::I64(v) => saved.push((Vec::new(), *v)),
        mut t => saved.push((t.floats().map(|v| v.to_vec()).unwrap_or_default(), 0)),
    });
    let indices: Vec<usize> = (offset..offset + batch).collect();
    let mut x = vec![0.0; batch * data.features()];
    let mut y = vec![0; batch];
    data.fill_batch(&indices, &mut x, &mut y);
    let loss = net.forward_backward(&x, &y, batch)?;
    let mut by_ptr: Vec<(*const f32, Vec<f32>)> = Vec::new();
    net.body
        .for_each_param(&mut |w, g| by_ptr.push((w.as_ptr(), g.to_vec())));
    let mut grads = Vec::new();
    let mut i = 0;
    net.visit_state(&mut |name, shape, t| {
        match t {
            crate::nn::TensorMut::I64(v) => *v = saved[i].1,
            crate::nn::TensorMut::F32(v) => {
                if let Some((_, g)) = by_ptr.iter().find(|(p, _)| *p == v.as_ptr()) {
                    grads.push(NamedGrad {
                        name: name.to_string(),
                        shape: shape.to_vec(),
                        values: g.clone(),
                    });
                } else {
                    v.copy_from_slice(&saved[i].0);
                }
            }
            crate::nn::TensorMut::F32T(v) => {
                if let Some((_, g)) = by_ptr.iter().find(|(p, _)| *p == v.as_ptr()) {
                    // Stored `cols x rows`; PyTorch's layout is `rows x cols`.
                    let (rows, cols) = (shape[0], shape[1]);
                    let mut out = vec![0.0; g.len()];
                    for c in 0..cols {
                        for r in 0..rows {
                            out[r * cols + c] = g[c * rows + r];
                        }
                    }
                    grads.push(NamedGrad {
                        name: name.to_string(),
                        shape: shape.to_vec(),
                        values: out,
                    });
                } else {
                    v.copy_from_slice(&saved[i].0);
                }
            }
        }
        i += 1;
    });
    Ok((loss, grads))
}

/// The mean training loss since the last evaluation: the sum and count of the step losses, kept
/// by the owner of a loop so that a resumed run continues the same mean.
#[derive(Clone, Copy, Debug, Default)]
pub struct LossSince {
    /// The sum of the step losses.
    pub sum: f64,
    /// The number of steps summed.
    pub count: usize,
}

impl LossSince {
    /// The mean so far (0 before any step).
    pub fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }
}

/// What the training loop tells its owner (`train`, `bench`, the studies).
pub trait Observer {
    /// At every evaluation point (every `eval_every` steps, and after the last step), with the
    /// mean training loss since the previous one. The loop then checks that every weight and
    /// BN statistic is finite.
    fn evaluate(&mut self, net: &mut Network, step: usize, mean_loss: f64) -> Result<()>;
    /// After every step (and after its evaluation, if any), with the step's loss and the
    /// running mean since the last evaluation: checkpoints, progress.
    fn after_step(
        &mut self,
        net: &mut Network,
        trainer: &Trainer,
        loss: f64,
        since: &LossSince,
        evaluated: bool,
    ) -> Result<()> {
        let _ = (net, trainer, loss, since, evaluated);
        Ok(())
    }
    /// Asked after every `after_step`: true stops the loop there with `Error::Stopped` (the
    /// observer saves what it needs in `after_step` first). Default: never.
    fn stop_requested(&self) -> bool {
        false
    }
}

/// The training loop every command and study uses: steps until `steps` (counted by
/// `trainer.step`, so a resumed trainer continues), the mean loss of each evaluation interval
/// in `loss`, an evaluation every `eval_every` steps (0: only after the last), and a stop
/// with `Error::Diverged` when the loss or (checked at evaluations) a weight or BN statistic is
/// NaN or infinite. When the observer asks to stop (`Observer::stop_requested`, checked after
/// every step but the last), the loop ends with `Error::Stopped` after the step.
pub fn train_loop(
    net: &mut Network,
    trainer: &mut Trainer,
    data: &Dataset,
    steps: usize,
    eval_every: usize,
    loss: &mut LossSince,
    observer: &mut dyn Observer,
) -> Result<()> {
    if trainer.step == 0 && trainer.config.bn.freeze == Some(FreezeBn::Population) {
        // Frozen BN on Algorithm 2's statistics of the starting weights: computed once, kept
        // in the running buffers, which frozen layers never update.
        population_statistics(net, data, trainer.config.batch_size, None)?;
        net.for_each_batch_norm(&mut |bn| {
            if let (Some(m), Some(v)) = (bn.population_mean.take(), bn.population_var.take()) {
                bn.running_mean = m;
                bn.running_var = v;
            }
            bn.inference = InferenceStats::Running;
        });
    }
    while trainer.step < steps {
        let l = trainer.step(net, data)?;
        loss.sum += l;
        loss.count += 1;
        let step = trainer.step;
        let evaluate = (eval_every > 0 && step.is_multiple_of(eval_every)) || step == steps;
        if evaluate {
            let mean = loss.mean();
            observer.evaluate(net, step, mean)?;
            // The BN running statistics can overflow without the loss doing so.
            if !net.all_finite() {
                return Err(Error::Diverged {
                    step,
                    msg: "a weight or BN statistic is NaN or infinite".into(),
                });
            }
            if let Some(d) = net.dist().cloned() {
                // Every rank must hold the same state bit for bit; check, cheaply.
                let h = net.state_hash();
                if d.comm.min_u64(h) != d.comm.max_u64(h) {
                    return Err(Error::config(
                        "data-parallel run",
                        format!("the ranks' weights differ at step {step}"),
                    ));
                }
            }
            *loss = LossSince::default();
        }
        observer.after_step(net, trainer, l, loss, evaluate)?;
        if trainer.step < steps && observer.stop_requested() {
            return Err(Error::Stopped { step: trainer.step });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grouped batches: each is `classes` pieces of one class each, no example repeats within
    /// an epoch, and the order stays a permutation (so run states restore it).
    #[test]
    fn grouped_batches_hold_few_classes() {
        let labels: Vec<u8> = (0..1000u32).map(|i| ((i * 7) % 10) as u8).collect();
        let mut b = Batches::new(Order::Grouped { classes: 2 }, 1000, 32, 5);
        b.set_labels(&labels).unwrap();
        // 100 per class, pieces of 16: 6 per class, 60 pieces, 30 batches an epoch.
        for epoch in 0..3 {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..30 {
                let idx = b.next_batch().to_vec();
                for piece in idx.chunks(16) {
                    assert!(piece.iter().all(|&i| labels[i] == labels[piece[0]]));
                }
                let classes: std::collections::HashSet<u8> =
                    idx.iter().map(|&i| labels[i]).collect();
                assert!(classes.len() <= 2, "{classes:?}");
                for i in idx {
                    assert!(seen.insert(i), "epoch {epoch}: example {i} twice");
                }
            }
            let (perm, _, _, _) = b.state();
            let mut sorted = perm.to_vec();
            sorted.sort();
            assert_eq!(sorted, (0..1000).collect::<Vec<_>>());
        }
        assert!(Order::parse("grouped:0").is_err());
        assert_eq!(
            Order::parse("grouped:4").unwrap(),
            Order::Grouped { classes: 4 }
        );
        let mut odd = Batches::new(Order::Grouped { classes: 3 }, 1000, 32, 5);
        let e = odd.set_labels(&labels).unwrap_err().to_string();
        assert!(e.contains("divisible by 3"), "{e}");
    }
    use crate::data::Pixels;
    use crate::nn::TensorMut;

    /// Evaluating with batch statistics normalizes each batch as training does, and changes
    /// no state: the running statistics and the eval-mode results stay as they were.
    /// A run whose thread count changes between steps (as under `tune_threads`) ends with the
    /// bits of a run on one thread: the sparse input layer, BN, the update and the batch fill
    /// all split their work without changing the arithmetic.
    #[test]
    fn changing_the_thread_count_between_steps_changes_no_bit() {
        let n = 120;
        let pixels: Vec<f32> = (0..n * 784)
            .map(|i| {
                if (i * 7919) % 5 == 0 {
                    ((i * 31) % 255) as f32 / 255.0
                } else {
                    0.0
                }
            })
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let data = Dataset::new(Pixels::F32(pixels), labels, [1, 28, 28], 10).unwrap();
        let config = TrainConfig {
            steps: 9,
            batch_size: 20,
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 1e-4,
            schedule: Schedule::Constant,
            seed: 5,
            order: Order::Shuffle,
            eval_every: 0,
            threads: 3,
            augment: Augment::None,
            bn: Default::default(),
        };
        let train = |tuner: Option<crate::tune::ThreadTuner>| {
            let threads = if tuner.is_some() { 3 } else { 1 };
            let mut net = Network::preset("mlp-fig1-bn", 3, 20, threads).unwrap();
            let mut trainer = Trainer::new(config.clone(), n, 784);
            if let Some(t) = tuner {
                trainer.set_tuner(t);
            }
            let mut losses = Vec::new();
            for _ in 0..9 {
                losses.push(trainer.step(&mut net, &data).unwrap().to_bits());
            }
            let mut all = losses;
            net.visit_state(&mut |_, _, t| match t {
                TensorMut::F32(v) | TensorMut::F32T(v) => {
                    all.extend(v.iter().map(|x| x.to_bits() as u64))
                }
                TensorMut::I64(v) => all.push(*v as u64),
            });
            (all, trainer.tuner().map(|t| t.steps_by_threads()))
        };
        let (one, _) = train(None);
        let (cycled, used) = train(Some(crate::tune::ThreadTuner::cycling(3)));
        assert_eq!(used, Some(vec![(3, 3), (2, 3), (1, 3)]));
        assert!(one == cycled, "other bits when the thread count changes");
    }

    #[test]
    fn batch_statistics_evaluation_changes_nothing() {
        let n = 24;
        let pixels: Vec<f32> = (0..n * 784)
            .map(|i| 50.0 + ((i * 7919) % 101) as f32 * 0.03)
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let data = Dataset::new(Pixels::F32(pixels), labels, [1, 28, 28], 10).unwrap();
        let mut net = Network::preset("mlp-fig1-bn", 3, 8, 1).unwrap();
        let state = |net: &mut Network| {
            let mut all = Vec::new();
            net.visit_state(&mut |_, _, t| match t {
                TensorMut::F32(v) | TensorMut::F32T(v) => all.extend(v.iter().map(|x| x.to_bits())),
                TensorMut::I64(v) => all.push(*v as u32),
            });
            all
        };
        let before = state(&mut net);
        let eval = |net: &mut Network| Evaluator::new(8, 784).evaluate(net, &data, None, None);
        let running = eval(&mut net).unwrap();
        let batch = Evaluator::new(8, 784)
            .with_batch_statistics()
            .evaluate(&mut net, &data, None, None)
            .unwrap();
        assert_eq!(state(&mut net), before, "no state changed");
        assert_eq!(eval(&mut net).unwrap().loss, running.loss);
        // Inputs near 50 with fresh running statistics (mean 0, variance 1) saturate the
        // sigmoids in eval mode; the batch's own statistics do not.
        assert_ne!(batch.loss, running.loss);
        // The last batch, as training mode sees it.
        let mut x = vec![0.0; 8 * 784];
        let mut y = vec![0; 8];
        data.fill_batch(&(16..24).collect::<Vec<_>>(), &mut x, &mut y);
        net.forward(&x, 8, Mode::Population).unwrap();
        let want = net.last_logits(8).to_vec();
        let mut got = Vec::new();
        Evaluator::new(8, 784)
            .with_batch_statistics()
            .for_each_batch(&mut net, &data, None, &mut |net, start, n, _| {
                if start == 16 {
                    got = net.last_logits(n).to_vec();
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(got, want);
    }
}
