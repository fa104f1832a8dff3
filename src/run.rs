//! A training run that survives being killed. Every `checkpoint_every` steps the run writes
//! everything the next step depends on into `RUN_DIR/state.safetensors`, atomically (temporary
//! file, fsync, rename): the weights and BN buffers (PyTorch names), the optimizer's momentum
//! buffers, the batch order (permutation, position, generator seed and stream position), the
//! dropout generators, the step count, the metrics so far, and the run's settings. A kill at any
//! instant leaves the previous state or the new one. `Run::resume` rebuilds the run from it, and
//! since nothing else carries over from one step to the next, the resumed run ends bit-identical
//! to one left alone (same machine, same thread count).
//!
//! Beside the state the run keeps `latest.safetensors` (the weights alone, loadable by
//! `bnlab eval` and PyTorch), `metrics.csv`, and at the end `final.safetensors`.

use crate::checkpoint::{self, f32_bytes, Entry, Loaded, TensorFile};
use crate::data::Split;
use crate::kernels::batch_norm::RunningAverage;
use crate::model::{self, ModelSpec};
use crate::network::Network;
use crate::nn::Layer;
use crate::report::write_atomic;
use crate::stop::Stop;
use crate::train::{train_loop, Evaluator, LossSince, Observer, TrainConfig, Trainer};
use crate::{Error, Result};
use safetensors::tensor::Dtype;
use std::path::{Path, PathBuf};

/// The run state in RUN_DIR: everything `Run::resume` needs.
pub const STATE_FILE: &str = "state.safetensors";
/// The latest weights alone in RUN_DIR (a `state_dict`, for `eval` or PyTorch).
pub const LATEST_FILE: &str = "latest.safetensors";
/// The weights at the end of the run, in RUN_DIR.
pub const FINAL_FILE: &str = "final.safetensors";
/// `step,train_loss,test_accuracy` per evaluation, in RUN_DIR.
pub const METRICS_FILE: &str = "metrics.csv";
/// Tensors in the state file that are not part of the model's `state_dict`.
const EXTRA: &str = "bnlab.";
const STATE_VERSION: u32 = 1;
/// Largest evaluation batch.
pub const EVAL_BATCH: usize = 500;

/// The settings of a run, fixed when it starts.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct RunSpec {
    /// The `--model` given: a preset name or a model file's path.
    pub model: String,
    /// The model file itself (JSON), so that a run resumes wherever it is moved to.
    #[serde(default)]
    pub model_json: Option<String>,
    /// The training settings.
    pub config: TrainConfig,
    /// `--bn-momentum` when given: overrides every BatchNorm's momentum of the model file.
    pub bn_momentum: Option<String>,
    /// The data given at the start (`--data`, absolute; `None`: the default lookup).
    pub data: Option<PathBuf>,
    /// `--dataset` given at the start.
    #[serde(default)]
    pub dataset: Option<String>,
    /// The input normalization (resolved: `auto` is the training set's statistics), applied
    /// to every batch and recorded in the checkpoints.
    #[serde(default)]
    pub normalization: Option<crate::data::Normalization>,
    /// `--init`: a checkpoint whose weights the run starts from.
    pub init: Option<PathBuf>,
    /// Write the run state every this many steps (0: only at the end).
    pub checkpoint_every: usize,
    /// The processes of a data-parallel run (`mpirun -n P`); `None` for one. A run resumes
    /// only with as many.
    #[serde(default)]
    pub ranks: Option<usize>,
    /// `--bn-sync` of a data-parallel run.
    #[serde(default)]
    pub bn_sync: Option<crate::dist::BnSync>,
    /// `--conv`: how the convolutions compute their 3x3 same-size products (a resumed run
    /// keeps its own; runs written before the flag existed are `direct`).
    #[serde(default)]
    pub conv: crate::nn::ConvAlgo,
}

/// The progress of a run, kept in the state file.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
struct Progress {
    version: u32,
    spec: RunSpec,
    #[serde(flatten)]
    training: TrainingState,
    metrics: String,
}

/// Everything the next training step depends on besides the tensors (weights, BN buffers,
/// momentum buffers, batch permutation): step counts, generator states, and the mean loss of the
/// current evaluation interval. Kept as JSON in a checkpoint's metadata beside the tensors of
/// [`training_entries`], and put back by [`restore_training`] (used by `train --out` and by
/// `study`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainingState {
    step: usize,
    sgd_steps_taken: usize,
    batches_pos: usize,
    batches_seed: String,
    batches_word_pos: String,
    dropout_rngs: Vec<(String, String)>,
    /// The augmentation generator (seed, stream position), when the run augments.
    #[serde(default)]
    augment_rng: Option<(String, String)>,
    /// f64 bits, so the mean loss of the current evaluation interval resumes exactly.
    loss_sum_bits: u64,
    loss_count: usize,
}

impl TrainingState {
    /// Steps done when the state was taken.
    pub fn step(&self) -> usize {
        self.step
    }
}

/// The tensors (`state_dict` entries, then momentum buffers and the batch permutation under
/// the `bnlab.` prefix) and the [`TrainingState`] of a network and its trainer: everything the
/// next step depends on.
pub fn training_entries(
    net: &mut Network,
    trainer: &Trainer,
    loss: &LossSince,
) -> (Vec<Entry>, TrainingState) {
    let mut entries: Vec<Entry> = checkpoint::state_entries(net);
    for (i, v) in trainer.sgd.velocity().iter().enumerate() {
        entries.push((
            format!("{EXTRA}velocity.{i}"),
            Dtype::F32,
            vec![v.len()],
            f32_bytes(v),
        ));
    }
    let (perm, pos, seed, word_pos) = trainer.batches.state();
    let perm_bytes: Vec<u8> = perm
        .iter()
        .flat_map(|&i| (i as i64).to_le_bytes())
        .collect();
    entries.push((
        format!("{EXTRA}order.perm"),
        Dtype::I64,
        vec![perm.len()],
        perm_bytes,
    ));
    let mut dropout_rngs = Vec::new();
    net.body.for_each_rng(&mut |r| {
        dropout_rngs.push((hex(&r.get_seed()), r.get_word_pos().to_string()))
    });
    let state = TrainingState {
        step: trainer.step,
        sgd_steps_taken: trainer.sgd.steps_taken,
        batches_pos: pos,
        batches_seed: hex(&seed),
        batches_word_pos: word_pos.to_string(),
        dropout_rngs,
        augment_rng: trainer
            .augment_rng_state()
            .map(|(s, w)| (hex(&s), w.to_string())),
        loss_sum_bits: loss.sum.to_bits(),
        loss_count: loss.count,
    };
    (entries, state)
}

/// Put the state written by [`training_entries`] (read back as `file` from `path`) into a
/// freshly built network and trainer of the same settings; returns the mean loss so far of the
/// current evaluation interval.
pub fn restore_training(
    net: &mut Network,
    trainer: &mut Trainer,
    file: &TensorFile,
    path: &Path,
    state: &TrainingState,
) -> Result<LossSince> {
    let bad = |msg: String| Error::checkpoint(path, msg);
    checkpoint::load_from(net, file, path, Some(EXTRA))?;
    // Optimizer momentum buffers.
    let mut velocity = Vec::new();
    while let Some((_, Loaded::F32(v))) = file
        .tensors
        .get(&format!("{EXTRA}velocity.{}", velocity.len()))
    {
        velocity.push(v.clone());
    }
    let mut sizes = Vec::new();
    net.body.for_each_param(&mut |w, _| sizes.push(w.len()));
    if !velocity.is_empty()
        && (velocity.len() != sizes.len()
            || velocity.iter().zip(&sizes).any(|(v, &s)| v.len() != s))
    {
        return Err(bad("momentum buffers do not fit the model".into()));
    }
    *trainer.sgd.velocity_mut() = velocity;
    trainer.sgd.steps_taken = state.sgd_steps_taken;
    trainer.step = state.step;
    // Batch order.
    let perm: Vec<usize> = match file.tensors.get(&format!("{EXTRA}order.perm")) {
        Some((_, Loaded::I64(v))) => v.iter().map(|&i| i as usize).collect(),
        _ => return Err(bad("missing the batch order".into())),
    };
    let seed = unhex32(&state.batches_seed).ok_or_else(|| bad("bad generator seed".into()))?;
    let word_pos: u128 = state
        .batches_word_pos
        .parse()
        .map_err(|_| bad("bad generator position".into()))?;
    trainer
        .batches
        .restore(perm, state.batches_pos, seed, word_pos)?;
    // Dropout generators.
    let mut saved = state.dropout_rngs.iter();
    let mut rng_err = None;
    net.body.for_each_rng(&mut |rng| {
        use rand::SeedableRng;
        match saved
            .next()
            .and_then(|(s, w)| Some((unhex32(s)?, w.parse::<u128>().ok()?)))
        {
            Some((s, w)) => {
                *rng = rand_chacha::ChaCha8Rng::from_seed(s);
                rng.set_word_pos(w);
            }
            None => rng_err = Some(bad("dropout generator state missing".into())),
        }
    });
    if let Some(e) = rng_err {
        return Err(e);
    }
    if let Some((s, w)) = &state.augment_rng {
        let seed = unhex32(s).ok_or_else(|| bad("bad augmentation generator seed".into()))?;
        let word_pos: u128 = w
            .parse()
            .map_err(|_| bad("bad augmentation generator position".into()))?;
        trainer.restore_augment_rng(seed, word_pos);
    }
    Ok(LossSince {
        sum: f64::from_bits(state.loss_sum_bits),
        count: state.loss_count,
    })
}

/// What the run reports as it goes.
pub enum Event<'a> {
    /// A training step is done.
    Step {
        /// Steps done (counted from 1).
        step: usize,
        /// The step's mean cross-entropy loss.
        loss: f64,
    },
    /// An evaluation on the test set is done.
    Evaluated {
        /// Steps done.
        step: usize,
        /// The mean training loss since the last evaluation.
        train_loss: f64,
        /// Test accuracy as a fraction in 0..1.
        test_accuracy: f64,
    },
    /// The run state was written.
    Checkpoint {
        /// Steps done.
        step: usize,
        /// The state file.
        path: &'a Path,
    },
}

/// A training run: settings, network, trainer, and where its state goes (see the module doc).
pub struct Run {
    /// The settings the run started with.
    pub spec: RunSpec,
    /// The network being trained.
    pub net: Network,
    /// The optimizer and batch order.
    pub trainer: Trainer,
    dir: Option<PathBuf>,
    metrics: String,
    loss: LossSince,
    /// Asked for by SIGINT / SIGTERM (the command line) or by the caller: the run stops after
    /// its current step, writing its state first (`Error::Stopped`).
    pub stop: Stop,
    /// This process writes the run's files (false on the ranks of a data-parallel run other
    /// than rank 0, which compute the same state).
    pub writes: bool,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl Run {
    /// Start a run. With a directory, refuses one that already holds a run state.
    pub fn new(
        spec: RunSpec,
        dir: Option<PathBuf>,
        data_shape: &[usize],
        train_len: usize,
    ) -> Result<Run> {
        let model_spec = Self::model_of(&spec)?;
        spec.config.validate(model_spec.has_batch_norm())?;
        let running_average = spec
            .bn_momentum
            .as_deref()
            .map(RunningAverage::parse)
            .transpose()?;
        if let Some(d) = &dir {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
            if d.join(STATE_FILE).exists() {
                return Err(Error::config(
                    "--out",
                    format!(
                        "{} already holds a run; continue it with --resume {0}, or choose another --out",
                        d.display()
                    ),
                ));
            }
        }
        let c = &spec.config;
        let input = model::resolve_input(&model_spec, Some(data_shape))?;
        let mut net = Network::build(
            &model_spec,
            &input,
            c.seed,
            c.batch_size.max(EVAL_BATCH),
            c.threads,
        )?;
        net.set_conv_algo(spec.conv);
        if let Some(init) = &spec.init {
            checkpoint::load(&mut net, init)?;
        }
        if let Some(ra) = running_average {
            net.for_each_batch_norm(&mut |bn| bn.running_average = ra);
        }
        net.normalization = spec.normalization.clone();
        c.validate_for_data(train_len)?;
        net.train_batch_size = Some(c.batch_size);
        let features = data_shape.iter().product();
        let mut trainer = Trainer::new(c.clone(), train_len, features);
        if let [ch, h, w] = *data_shape {
            trainer.prepare_augmentation([ch, h, w])?;
        } else if c.augment != crate::train::Augment::None {
            return Err(Error::config("--augment", "needs image data [C, H, W]"));
        }
        Ok(Run {
            spec,
            net,
            trainer,
            dir,
            metrics: String::from("step,train_loss,test_accuracy\n"),
            loss: LossSince::default(),
            stop: Stop::new(),
            writes: true,
        })
    }

    /// The model of a run: the file recorded in its settings, else `--model` resolved.
    pub fn model_of(spec: &RunSpec) -> Result<ModelSpec> {
        match &spec.model_json {
            Some(json) => ModelSpec::parse(json, &spec.model),
            None => model::resolve(&spec.model),
        }
    }

    /// The settings saved in a run directory.
    pub fn read_spec(dir: &Path) -> Result<RunSpec> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Err(Error::config(
                "--resume",
                format!(
                    "no run to resume in {} ({STATE_FILE} is missing)",
                    dir.display()
                ),
            ));
        }
        let file = TensorFile::read(&path)?;
        Ok(Self::progress_of(&file, &path)?.spec)
    }

    fn progress_of(file: &TensorFile, path: &Path) -> Result<Progress> {
        let text = file.metadata.get("bnlab_run").ok_or_else(|| {
            Error::checkpoint(path, "not a bnlab run state (no 'bnlab_run' metadata)")
        })?;
        let p: Progress = serde_json::from_str(text)
            .map_err(|e| Error::checkpoint(path, format!("unreadable run state: {e}")))?;
        if p.version != STATE_VERSION {
            return Err(Error::checkpoint(
                path,
                format!(
                    "run state version {} (this bnlab reads {STATE_VERSION})",
                    p.version
                ),
            ));
        }
        Ok(p)
    }

    /// Continue the run saved in `dir`.
    pub fn resume(dir: &Path, data_shape: &[usize], train_len: usize) -> Result<Run> {
        let path = dir.join(STATE_FILE);
        let file = TensorFile::read(&path)?;
        let p = Self::progress_of(&file, &path)?;
        let mut run = Run::new(p.spec.clone(), None, data_shape, train_len)?;
        run.dir = Some(dir.to_path_buf());
        run.loss = restore_training(&mut run.net, &mut run.trainer, &file, &path, &p.training)?;
        run.metrics = p.metrics;
        Ok(run)
    }

    /// Steps done so far.
    pub fn step(&self) -> usize {
        self.trainer.step
    }

    /// True when every step of the configuration is done.
    pub fn is_complete(&self) -> bool {
        self.trainer.step >= self.spec.config.steps
    }

    /// Write the run state, then the latest weights and the metrics (all atomically).
    pub fn save_state(&mut self) -> Result<PathBuf> {
        let Some(dir) = self.dir.clone() else {
            return Err(Error::config(
                "--out",
                "no run directory to checkpoint into",
            ));
        };
        write_state(
            &dir,
            &self.spec,
            &mut self.net,
            &self.trainer,
            &self.metrics,
            &self.loss,
        )
    }

    /// Train to the end, evaluating every `eval_every` steps and checkpointing every
    /// `checkpoint_every` steps (and at the end). On divergence the run stops at once; the
    /// state on disk is the last good one. When `stop` is requested the run ends after the
    /// current step with `Error::Stopped`, its state (with a run directory) written first.
    pub fn run(&mut self, data: &Split, on_event: &mut dyn FnMut(Event<'_>)) -> Result<()> {
        let c = self.spec.config.clone();
        if self.dir.is_some() && self.writes && self.trainer.step == 0 {
            // A run killed before its first periodic checkpoint can be resumed too.
            self.save_state()?;
        }
        let mut observer = RunObserver {
            evaluator: Evaluator::new(EVAL_BATCH, data.train.features()),
            test: &data.test,
            metrics: &mut self.metrics,
            on_event,
            dir: self.dir.as_deref().filter(|_| self.writes),
            spec: &self.spec,
            stop: &self.stop,
            agreed_stop: None,
        };
        train_loop(
            &mut self.net,
            &mut self.trainer,
            &data.train,
            c.steps,
            c.eval_every,
            &mut self.loss,
            &mut observer,
        )?;
        if let Some(dir) = self.dir.clone().filter(|_| self.writes) {
            // Again, for a run resumed after a kill that landed between its last state and
            // the metrics file: the state holds every line, the file may not yet.
            write_atomic(&dir.join(METRICS_FILE), self.metrics.as_bytes())?;
            checkpoint::save(&mut self.net, &dir.join(FINAL_FILE))?;
        }
        Ok(())
    }

    /// The run directory, if the run keeps its state on disk.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }
}

/// Write everything the next step of a run depends on into `dir`, atomically: the run state
/// (weights, BN buffers, momentum buffers, batch order, generators, step, metrics, the loss
/// since the last evaluation, the settings), then the latest weights and the metrics.
fn write_state(
    dir: &Path,
    spec: &RunSpec,
    net: &mut Network,
    trainer: &Trainer,
    metrics: &str,
    loss: &LossSince,
) -> Result<PathBuf> {
    let (entries, training) = training_entries(net, trainer, loss);
    let progress = Progress {
        version: STATE_VERSION,
        spec: spec.clone(),
        training,
        metrics: metrics.to_string(),
    };
    let mut meta = checkpoint::model_metadata(net);
    meta.insert(
        "bnlab_run".to_string(),
        serde_json::to_string(&progress).map_err(|e| Error::config("run state", e.to_string()))?,
    );
    let path = dir.join(STATE_FILE);
    checkpoint::write_entries(&path, &entries, meta)?;
    checkpoint::save(net, &dir.join(LATEST_FILE))?;
    write_atomic(&dir.join(METRICS_FILE), metrics.as_bytes())?;
    Ok(path)
}

/// A run's side of the training loop: evaluations into the metrics and events, checkpoints
/// into the run directory.
struct RunObserver<'a> {
    evaluator: Evaluator,
    test: &'a crate::data::Dataset,
    metrics: &'a mut String,
    on_event: &'a mut dyn FnMut(Event<'_>),
    dir: Option<&'a Path>,
    spec: &'a RunSpec,
    stop: &'a Stop,
    /// In a data-parallel run: the stop decision agreed over the ranks after the last step.
    agreed_stop: Option<bool>,
}

impl Observer for RunObserver<'_> {
    fn evaluate(&mut self, net: &mut Network, step: usize, mean_loss: f64) -> Result<()> {
        let ev = self.evaluator.evaluate(net, self.test, None, None)?;
        self.metrics
            .push_str(&format!("{step},{mean_loss:.6},{:.6}\n", ev.accuracy()));
        (self.on_event)(Event::Evaluated {
            step,
            train_loss: mean_loss,
            test_accuracy: ev.accuracy(),
        });
        Ok(())
    }

    fn after_step(
        &mut self,
        net: &mut Network,
        trainer: &Trainer,
        loss: f64,
        since: &LossSince,
        _evaluated: bool,
    ) -> Result<()> {
        let step = trainer.step;
        if let Some(d) = net.dist() {
            // Ranks see a signal at different steps: they stop together, at the first step
            // after which any of them has seen one (mpirun sends SIGTERM to every rank).
            let reason = d.comm.max_u64(self.stop.reason() as u64);
            if reason != 0 && !self.stop.requested() {
                self.stop.request(reason as usize);
            }
            // A signal landing on one rank after this agreement waits for the next step's.
            self.agreed_stop = Some(reason != 0);
        }
        (self.on_event)(Event::Step { step, loss });
        let every = self.spec.checkpoint_every;
        let now = (every > 0 && step.is_multiple_of(every))
            || step == self.spec.config.steps
            || self.stop_requested();
        if let (Some(dir), true) = (self.dir, now) {
            let path = write_state(dir, self.spec, net, trainer, self.metrics, since)?;
            (self.on_event)(Event::Checkpoint { step, path: &path });
        }
        Ok(())
    }

    fn stop_requested(&self) -> bool {
        self.agreed_stop.unwrap_or_else(|| self.stop.requested())
    }
}
