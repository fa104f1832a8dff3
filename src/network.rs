//! A model ready to train: the layers built from a model file (`model`), the softmax
//! cross-entropy loss on top, and the logits buffers, all sized once for the largest batch.

use crate::dist::Dist;
use crate::kernels::activation::{softmax_cross_entropy, softmax_cross_entropy_of};
use crate::model::{self, ModelSpec};
use crate::nn::{
    BatchNorm, Ctx, Dropout, InferenceStats, Layer, Mode, Noise, Sequential, TensorMut,
};
use crate::{Error, Result};

/// A network ready to train and evaluate: the layers of a model file, softmax cross-entropy on
/// their output, and the buffers for batches of up to `max_batch` examples.
pub struct Network {
    /// The model file the network was built from (its `name` is the checkpoint's model name).
    pub spec: ModelSpec,
    /// The shape of one example (`[784]`, `[1, 28, 28]`, `[3, 32, 32]`).
    pub input_shape: Vec<usize>,
    /// The layers: input `n x input_size`, output the `n x classes` logits.
    pub body: Sequential,
    /// Most threads a kernel may use (1 or 2 in practice).
    pub threads: usize,
    logits: Vec<f32>,
    dlogits: Vec<f32>,
    max_batch: usize,
    batch_norms: usize,
    /// The per-channel input normalization the network was trained with (applied by the data
    /// set when batches are filled; recorded in checkpoints and exported to ONNX).
    pub normalization: Option<crate::data::Normalization>,
    /// The mini-batch size the network was trained with, when known (recorded in
    /// checkpoints): the batch size of Algorithm 2's population statistics.
    pub train_batch_size: Option<usize>,
    /// The data-parallel run this network is a replica in (`set_dist`), if any.
    dist: Option<Dist>,
}

impl Network {
    /// Build `spec` for examples of `input_shape` (see `model::resolve_input`) with weights
    /// from `seed`, sized for batches of up to `max_batch`.
    pub fn build(
        spec: &ModelSpec,
        input_shape: &[usize],
        seed: u64,
        max_batch: usize,
        threads: usize,
    ) -> Result<Self> {
        if max_batch == 0 {
            return Err(Error::config("batch size", "must be at least 1"));
        }
        let built = model::build(spec, input_shape, seed, true)?;
        let mut body = built.body;
        // BN + ReLU and BN + sigmoid in one pass each (the same bits, fewer bytes moved).
        body.fuse(true);
        body.reserve(max_batch);
        let k = body.out_size();
        let mut batch_norms = 0;
        body.for_each_batch_norm(&mut |_| batch_norms += 1);
        Ok(Network {
            spec: spec.clone(),
            input_shape: built.input_shape,
            body,
            threads: threads.max(1),
            logits: vec![0.0; max_batch * k],
            dlogits: vec![0.0; max_batch * k],
            max_batch,
            batch_norms,
            normalization: None,
            train_batch_size: None,
            dist: None,
        })
    }

    /// A preset whose input shape the file fixes (not `resnet20*`, whose input comes from the
    /// data: use `build` with `model::resolve_input`).
    pub fn preset(name: &str, seed: u64, max_batch: usize, threads: usize) -> Result<Self> {
        Network::preset_with_norm(name, None, seed, max_batch, threads)
    }

    /// A preset with `--norm`'s rewrite (`norm`, e.g. `gn:4`) applied when the preset has
    /// BatchNorm layers; presets without them are built as they are.
    pub fn preset_with_norm(
        name: &str,
        norm: Option<&str>,
        seed: u64,
        max_batch: usize,
        threads: usize,
    ) -> Result<Self> {
        let mut spec = model::preset(name)?;
        if let Some(n) = norm {
            if spec.has_batch_norm() {
                spec = model::apply_norm(&spec, model::NormChoice::parse(n)?)?;
            }
        }
        let input = model::resolve_input(&spec, None)?;
        Network::build(&spec, &input, seed, max_batch, threads)
    }

    /// Make this network one replica of a data-parallel run (`None`: a network of its own
    /// again): training steps take this rank's slice of every batch and sum the gradients over
    /// the ranks (`train::Trainer::step`), evaluation and Algorithm 2 are sharded, every
    /// BatchNorm synchronizes as `dist.bn_sync` says, and dropout and noisy BN draw for the
    /// whole global batch and keep this rank's slice. Errors for a layer with a random
    /// generator that has no data-parallel form (none today).
    pub fn set_dist(&mut self, dist: Option<Dist>) -> Result<()> {
        let mut generators = 0;
        self.body.for_each_rng(&mut |_| generators += 1);
        let mut replicas = 0;
        for_each_leaf(&mut self.body, &mut |layer| {
            let any = layer.as_any_mut();
            if let Some(d) = any.downcast_mut::<Dropout>() {
                d.set_dist(dist.clone());
                replicas += 1;
            } else if let Some(n) = any.downcast_mut::<Noise>() {
                n.set_dist(dist.clone());
                replicas += 1;
            }
        });
        if dist.is_some() && generators > replicas {
            // Each rank would draw for its own slice: the generators would part ways between
            // the ranks (and from one process), and a resumed run would not continue them.
            self.set_dist(None)?;
            return Err(Error::config(
                "--model",
                format!(
                    "{} has layers with random draws that a data-parallel run does not support",
                    self.spec.name
                ),
            ));
        }
        let mut err = None;
        self.body.for_each_batch_norm(&mut |bn| {
            if let Err(e) = bn.set_sync(dist.clone()) {
                err.get_or_insert(e);
            }
        });
        if let Some(e) = err {
            self.set_dist(None)?;
            return Err(e);
        }
        self.dist = dist;
        Ok(())
    }

    /// Check that training batches of `batch` examples split over the run's ranks in a way
    /// every layer can follow (ghost batches must not straddle two ranks, see
    /// `BatchNorm::check_split`); Ok without a data-parallel run.
    pub fn check_split(&mut self, batch: usize) -> Result<()> {
        let Some(p) = self.dist().map(|d| d.comm.size()) else {
            return Ok(());
        };
        let mut err = None;
        self.body.for_each_batch_norm(&mut |bn| {
            if let Err(e) = bn.check_split(batch, p) {
                err.get_or_insert(e);
            }
        });
        err.map_or(Ok(()), Err)
    }

    /// Tell the layers of a data-parallel run that the next pass is over `n` examples of a
    /// global batch of `batch` (`n == batch` in one process, or for a batch of this rank's own).
    fn set_global_batch(&self, n: usize, batch: usize) {
        if let Some(d) = self.dist() {
            d.set_batch(if batch == n && d.slice(batch).len() != n {
                0
            } else {
                batch
            });
        }
    }

    /// The data-parallel run of more than one rank this network is part of, if any.
    pub fn dist(&self) -> Option<&Dist> {
        self.dist.as_ref().filter(|d| d.comm.size() > 1)
    }

    /// The model's name (a preset's name, or the model file's).
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// True when the network has at least one BatchNorm layer.
    pub fn has_batch_norm(&self) -> bool {
        self.batch_norms > 0
    }

    /// Values per example at the input.
    pub fn input_size(&self) -> usize {
        self.body.in_size()
    }

    /// The largest batch `forward` and `forward_backward` accept.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The number of classes: logits per example.
    pub fn classes(&self) -> usize {
        self.body.out_size()
    }

    fn ctx(&self, mode: Mode) -> Ctx {
        Ctx {
            mode,
            threads: self.threads,
        }
    }

    fn check_batch(&self, x: &[f32], n: usize) -> Result<()> {
        if n == 0 || n > self.max_batch {
            return Err(Error::Shape(format!(
                "batch of {n} examples, network sized for 1..={}",
                self.max_batch
            )));
        }
        if x.len() < n * self.body.in_size() {
            return Err(Error::Shape(format!(
                "input holds {} values, need {} x {}",
                x.len(),
                n,
                self.body.in_size()
            )));
        }
        Ok(())
    }

    /// Forward pass of `n` examples (`x`: `n x input_size` values, row-major); returns the
    /// `n x classes` logits.
    ///
    /// Errors: `Error::Shape` when `n` is 0 or above `max_batch`, or `x` holds too few values;
    /// `Error::BatchTooSmall` for a BN network in `Mode::Train` or `Mode::Population` with
    /// statistics over fewer than 2 values (a batch of one).
    pub fn forward(&mut self, x: &[f32], n: usize, mode: Mode) -> Result<&[f32]> {
        self.forward_of(x, n, n, mode)
    }

    /// [`Network::forward`] of `n` examples that are this rank's slice of a global batch of
    /// `batch` (`batch == n`: a batch of this rank's own, such as an evaluation shard's), so
    /// that BN merges the global batch's statistics (or normalizes the global batch's ghost
    /// batches) in `Mode::Population`. Without a data-parallel run, `forward`.
    pub fn forward_of(&mut self, x: &[f32], n: usize, batch: usize, mode: Mode) -> Result<&[f32]> {
        self.check_batch(x, n)?;
        self.set_global_batch(n, batch);
        let ctx = self.ctx(mode);
        self.body.forward(ctx, x, &mut self.logits, n)?;
        Ok(&self.logits[..n * self.body.out_size()])
    }

    /// The logits of the last forward pass's first `n` examples, `n x classes`.
    pub fn last_logits(&self, n: usize) -> &[f32] {
        &self.logits[..n * self.body.out_size()]
    }

    /// One forward and backward pass in training mode on `n` examples with their class
    /// `labels`; leaves the gradients in the layers (for `optim::Sgd::step`) and returns the
    /// mean cross-entropy loss.
    ///
    /// Errors: as [`Network::forward`], and `Error::Shape` when `labels` holds fewer than `n`
    /// labels or one is not below `classes`.
    pub fn forward_backward(&mut self, x: &[f32], labels: &[usize], n: usize) -> Result<f64> {
        self.forward_backward_of(x, labels, n, n)
    }

    /// [`Network::forward_backward`] on `n` examples that are one rank's slice of a batch of
    /// `batch`: the returned loss is the mean over the `n`, the gradients are those of the
    /// mean loss over the whole batch (see `softmax_cross_entropy_of`), this rank's part.
    pub fn forward_backward_of(
        &mut self,
        x: &[f32],
        labels: &[usize],
        n: usize,
        batch: usize,
    ) -> Result<f64> {
        self.check_batch(x, n)?;
        let ctx = self.ctx(Mode::Train);
        let k = self.body.out_size();
        if labels.len() < n {
            return Err(Error::Shape(format!(
                "{} labels for a batch of {n}",
                labels.len()
            )));
        }
        if let Some(&l) = labels[..n].iter().find(|&&l| l >= k) {
            return Err(Error::Shape(format!(
                "label {l} for a network of {k} classes"
            )));
        }
        self.set_global_batch(n, batch);
        self.body.forward(ctx, x, &mut self.logits, n)?;
        let loss =
            softmax_cross_entropy_of(&self.logits, labels, n, k, Some(&mut self.dlogits), batch);
        self.body
            .backward(ctx, x, &self.logits, &self.dlogits, None, n);
        Ok(loss)
    }

    /// Mean cross-entropy of the last forward pass's logits against `labels` (`n` of them,
    /// each below `classes`; panics otherwise).
    pub fn loss_of_last(&self, labels: &[usize], n: usize) -> f64 {
        softmax_cross_entropy(&self.logits, labels, n, self.body.out_size(), None)
    }

    /// Each BatchNorm layer of the network, in forward order.
    pub fn for_each_batch_norm(&mut self, f: &mut dyn FnMut(&mut BatchNorm)) {
        self.body.for_each_batch_norm(f)
    }

    /// Compute every convolution's 3x3 same-size products with `algo` (`ConvAlgo::Direct`
    /// unless set).
    pub fn set_conv_algo(&mut self, algo: crate::nn::ConvAlgo) {
        fn walk(layer: &mut dyn crate::nn::Layer, algo: crate::nn::ConvAlgo) {
            if let Some(c) = layer.as_any_mut().downcast_mut::<crate::nn::Conv2d>() {
                c.set_algo(algo);
            }
            for child in layer.children() {
                walk(child, algo);
            }
        }
        walk(&mut self.body, algo);
    }

    /// Make every BatchNorm normalize with `stats` in `Mode::Eval` (population statistics
    /// only where Algorithm 2 has computed them, else the running averages).
    pub fn set_inference_stats(&mut self, stats: InferenceStats) {
        self.for_each_batch_norm(&mut |bn| bn.inference = stats);
    }

    /// Every tensor of the `state_dict`, in order.
    pub fn visit_state(&mut self, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        self.body.visit_state("", f)
    }

    /// A hash (FNV-1a) of the bits of every tensor of the state: equal on the ranks of a
    /// data-parallel run, which hold the same state.
    pub fn state_hash(&mut self) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut add = |v: u64| {
            h ^= v;
            h = h.wrapping_mul(0x0100_0000_01b3);
        };
        self.visit_state(&mut |_, _, t| match t {
            TensorMut::I64(v) => add(*v as u64),
            mut t => {
                for x in t.floats().into_iter().flatten() {
                    add(x.to_bits() as u64);
                }
            }
        });
        h
    }

    /// True when every parameter and buffer is finite.
    pub fn all_finite(&mut self) -> bool {
        let mut ok = true;
        self.visit_state(&mut |_, _, mut t| {
            if let Some(v) = t.floats() {
                ok &= v.iter().all(|x| x.is_finite());
            }
        });
        ok
    }
}

/// `f` on every leaf layer of `layer`'s tree (the layers without children), in forward order.
fn for_each_leaf(layer: &mut dyn Layer, f: &mut dyn FnMut(&mut dyn Layer)) {
    if layer.children().is_empty() {
        f(layer);
    } else {
        for child in layer.children() {
            for_each_leaf(child, f);
        }
    }
}
