//! A study's progress on disk, so that a study stopped at any instant (Ctrl-C, SIGTERM, SIGKILL,
//! a power cut) continues where it was and ends with the same results, bit for bit, as one left
//! alone. Every `bnlab reproduce ...` uses it; a new study needs only the calls below.
//!
//! A study directory (`--out`) holds:
//!
//! | path | what |
//! | --- | --- |
//! | `study.json` | which study, its settings (`setup`) and data, written once when it starts |
//! | `runs/KEY/result.json` | a finished run's result (whatever the study serializes) |
//! | `runs/KEY/*.f32` | a finished run's large arrays (little-endian f32), beside its result |
//! | `runs/KEY/checkpoint.safetensors` | a running run's state: weights, BN buffers, momentum, batch order, generators, and the study's own per-run data (its curve so far) |
//!
//! Every file is written atomically (`fsutil::write_atomic`), and a result is written before its
//! checkpoint is removed, so a kill at any instant leaves either the previous state or the next.
//!
//! The calls, for a study that trains runs keyed by a label:
//!
//! 1. [`Study::create`] (refuses a directory that already holds a study) or [`Study::open`]
//!    (resume; the settings come from `study.json`, so a resumed study is the same study);
//!    [`Study::with_stop`] shares the command line's [`Stop`].
//! 2. Per run: [`Study::result`] gives a finished run's result (skip the training); else build
//!    the network and trainer as for a fresh run, call [`Study::resume_run`] (restores them and
//!    the tracker from the checkpoint, if any; `None`: start fresh), then [`Study::train_run`]
//!    (the one training loop, checkpointing every `checkpoint_every` steps and when a stop is
//!    requested; `Err(Error::Stopped)` then), and [`Study::finish`] with the run's result.
//! 3. The report is built from the results alone, so it is the same whether the runs were
//!    trained in one go or over several sessions. Wall-clock times differ between the two, so
//!    they stay out of `results.json` (the reports write them to `timings.json`).
//!
//! The per-run data a study follows (its accuracy curve, the training time so far) travels in the
//! checkpoint through the [`Tracked`] trait: an [`Observer`] that can also say what to save and
//! take it back.

use crate::checkpoint::{self, TensorFile};
use crate::data::Dataset;
use crate::dist::{BnSync, Dist};
use crate::fsutil::write_atomic;
use crate::network::Network;
use crate::run::{restore_training, training_entries, TrainingState};
use crate::stop::Stop;
use crate::train::{train_loop, LossSince, Observer, Trainer};
use crate::{Error, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The study's description in its directory.
pub const STUDY_FILE: &str = "study.json";
/// The folder of the runs in a study directory.
pub const RUNS_DIR: &str = "runs";
/// A finished run's result, in `runs/KEY/`.
pub const RESULT_FILE: &str = "result.json";
/// A running run's state, in `runs/KEY/`.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
const VERSION: u32 = 1;
const META_KEY: &str = "bnlab_study_run";

/// What `study.json` holds.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Manifest {
    /// Format version.
    pub version: u32,
    /// The study's name (`mnist`, `inception`): a directory of one study is not resumed as
    /// another.
    pub study: String,
    /// The study's settings, as the study serialized them; a resumed study reads them back.
    pub setup: serde_json::Value,
    /// The data given when the study started (absolute), if any.
    pub data: Option<PathBuf>,
    /// The processes of a data-parallel study (`mpirun -n P`, P > 1); `None` for one. A
    /// study resumes only with as many (its runs' checkpoints continue bit-identically only
    /// with the same reductions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<usize>,
    /// `--bn-sync` of a data-parallel study.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bn_sync: Option<BnSync>,
}

/// A study directory (see the module doc).
pub struct Study {
    dir: PathBuf,
    manifest: Manifest,
    stop: Stop,
    /// The data-parallel run every run of the study is a replica in (`with_dist`), if any.
    dist: Option<Dist>,
}

/// The per-run data a study follows beside the training state, saved in every checkpoint and
/// given back on resume: an [`Observer`] of the training loop that can also be saved.
pub trait Tracked: Observer {
    /// What is saved: the curve so far, the training time so far, ...
    type Saved: Serialize + DeserializeOwned;
    /// The data to save now.
    fn save(&self) -> Self::Saved;
    /// Take back what [`Tracked::save`] gave, on resume.
    fn restore(&mut self, saved: Self::Saved);
}

/// What a run's checkpoint keeps besides its tensors.
#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointMeta<S> {
    version: u32,
    training: TrainingState,
    tracked: S,
}

/// A file-name-safe form of a run's label: ASCII letters, digits, `.`, `-` and `_` kept, every
/// other character `_` (`"BN-x30 seed 2"` -> `"BN-x30_seed_2"`).
pub fn run_key(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Study {
    /// Start study `study` in `dir` (created if needed) with `setup`; refuses a directory that
    /// already holds a study, saying how to continue it.
    pub fn create(
        dir: &Path,
        study: &str,
        setup: serde_json::Value,
        data: Option<PathBuf>,
    ) -> Result<Study> {
        Study::create_with(dir, study, setup, data, None)
    }

    /// Refuse `dir` for a new study when it already holds one, saying how to continue it
    /// (what [`Study::create`] checks first; the ranks of a data-parallel study other than
    /// rank 0 check it without creating anything).
    pub fn check_new(dir: &Path, study: &str) -> Result<()> {
        if dir.join(STUDY_FILE).exists() {
            return Err(Error::config(
                "--out",
                format!(
                    "{} already holds a study; continue it with `bnlab reproduce {study} --resume {0}`, or choose another --out",
                    dir.display()
                ),
            ));
        }
        Ok(())
    }

    /// [`Study::create`], recording a data-parallel study's process count and `--bn-sync`
    /// (`ranks`: P > 1 and the sync; `None` for one process).
    pub fn create_with(
        dir: &Path,
        study: &str,
        setup: serde_json::Value,
        data: Option<PathBuf>,
        ranks: Option<(usize, BnSync)>,
    ) -> Result<Study> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Study::check_new(dir, study)?;
        let manifest = Manifest {
            version: VERSION,
            study: study.to_string(),
            setup,
            data,
            ranks: ranks.map(|r| r.0),
            bn_sync: ranks.map(|r| r.1),
        };
        let runs = dir.join(RUNS_DIR);
        std::fs::create_dir_all(&runs).map_err(|e| Error::io(&runs, e))?;
        let text = serde_json::to_string_pretty(&manifest)
            .map_err(|e| Error::config("study", e.to_string()))?;
        write_atomic(&dir.join(STUDY_FILE), format!("{text}\n").as_bytes())?;
        Ok(Study {
            dir: dir.to_path_buf(),
            manifest,
            stop: Stop::new(),
            dist: None,
        })
    }

    /// Open the study `study` saved in `dir` (to resume it, or to report on it).
    pub fn open(dir: &Path, study: &str) -> Result<Study> {
        let path = dir.join(STUDY_FILE);
        if !path.exists() {
            return Err(Error::config(
                "--resume",
                format!("no study in {} ({STUDY_FILE} is missing)", dir.display()),
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let manifest: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::data(&path, format!("not a study description: {e}")))?;
        if manifest.version != VERSION {
            return Err(Error::data(
                &path,
                format!(
                    "study format version {} (this bnlab reads {VERSION})",
                    manifest.version
                ),
            ));
        }
        if manifest.study != study {
            return Err(Error::config(
                "--resume",
                format!(
                    "{} holds a `{}` study, not `{study}`",
                    dir.display(),
                    manifest.study
                ),
            ));
        }
        Ok(Study {
            dir: dir.to_path_buf(),
            manifest,
            stop: Stop::new(),
            dist: None,
        })
    }

    /// Use `stop` (shared with the signal handler): runs stop after their current step.
    pub fn with_stop(mut self, stop: Stop) -> Self {
        self.stop = stop;
        self
    }

    /// The stop request every run of the study honours.
    pub fn stop(&self) -> &Stop {
        &self.stop
    }

    /// Make every run of the study one replica of the data-parallel run `dist` (`None`, or a
    /// collective of one rank: a study of its own). The study's runs then go one at a time,
    /// every rank taking part in each, in the same order; a stop is agreed over the ranks
    /// (the first step after which any rank has seen one); and only rank 0 writes the study's
    /// files (every rank computes the same state). The study directory must be visible to
    /// every rank (every rank reads finished results and checkpoints when resuming).
    pub fn with_dist(mut self, dist: Option<Dist>) -> Self {
        self.dist = dist.filter(|d| d.comm.size() > 1);
        self
    }

    /// The data-parallel run of more than one rank the study's networks join
    /// (`Network::set_dist`), if any.
    pub fn dist(&self) -> Option<&Dist> {
        self.dist.as_ref()
    }

    /// True when this process writes the study's files: always, except on the ranks of a
    /// data-parallel study other than rank 0.
    pub fn writes(&self) -> bool {
        self.dist.as_ref().is_none_or(|d| d.comm.rank() == 0)
    }

    /// In a data-parallel study, agree over the ranks on whether to stop (any rank asked: then
    /// every rank's `stop` is requested); returns the agreed answer. In one process, the
    /// stop's own state. Every rank must call it at the same point.
    pub fn agree_stop(&self) -> bool {
        if let Some(d) = &self.dist {
            let reason = d.comm.max_u64(self.stop.reason() as u64);
            if reason != 0 && !self.stop.requested() {
                self.stop.request(reason as usize);
            }
            return reason != 0;
        }
        self.stop.requested()
    }

    /// The study directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The study's description (`study.json`).
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The study's settings as saved; `serde_json::from_value` turns them back into the
    /// study's setup type.
    pub fn setup<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.manifest.setup.clone()).map_err(|e| {
            Error::data(
                self.dir.join(STUDY_FILE),
                format!("settings unreadable: {e}"),
            )
        })
    }

    /// The folder of run `label` (not created).
    pub fn run_dir(&self, label: &str) -> PathBuf {
        self.dir.join(RUNS_DIR).join(run_key(label))
    }

    fn ensure_run_dir(&self, label: &str) -> Result<PathBuf> {
        let d = self.run_dir(label);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
        Ok(d)
    }

    /// True when run `label` has a result.
    pub fn is_finished(&self, label: &str) -> bool {
        self.run_dir(label).join(RESULT_FILE).is_file()
    }

    /// True when run `label` has a checkpoint (it started and did not finish).
    pub fn is_started(&self, label: &str) -> bool {
        self.run_dir(label).join(CHECKPOINT_FILE).is_file()
    }

    /// The result of run `label`, if it finished.
    pub fn result<T: DeserializeOwned>(&self, label: &str) -> Result<Option<T>> {
        let path = self.run_dir(label).join(RESULT_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error::data(&path, format!("unreadable run result: {e}")))
    }

    /// Record run `label` as finished with `result` (atomically), then drop its checkpoint.
    /// Floats survive exactly (serde_json writes the shortest form that reads back the same).
    pub fn finish<T: Serialize>(&self, label: &str, result: &T) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let d = self.ensure_run_dir(label)?;
        let path = d.join(RESULT_FILE);
        let text = serde_json::to_string(result)
            .map_err(|e| Error::data(&path, format!("result not serializable: {e}")))?;
        write_atomic(&path, text.as_bytes())?;
        let ckpt = d.join(CHECKPOINT_FILE);
        if ckpt.exists() {
            std::fs::remove_file(&ckpt).map_err(|e| Error::io(&ckpt, e))?;
        }
        Ok(())
    }

    /// Keep a large array of run `label` (`runs/KEY/NAME.f32`, little-endian), written before
    /// [`Study::finish`].
    pub fn save_floats(&self, label: &str, name: &str, values: &[f32]) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let d = self.ensure_run_dir(label)?;
        write_atomic(
            &d.join(format!("{}.f32", run_key(name))),
            &checkpoint::f32_bytes(values),
        )
    }

    /// An array kept by [`Study::save_floats`], if present.
    pub fn load_floats(&self, label: &str, name: &str) -> Result<Option<Vec<f32>>> {
        let path = self.run_dir(label).join(format!("{}.f32", run_key(name)));
        if !path.is_file() {
            return Ok(None);
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        if bytes.len() % 4 != 0 {
            return Err(Error::data(&path, "length is not a multiple of 4"));
        }
        Ok(Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ))
    }

    /// Write run `label`'s checkpoint: everything the next step of `net` and `trainer`
    /// depends on, the loss since the last evaluation, and `tracked`'s data.
    pub fn save_checkpoint<T: Tracked + ?Sized>(
        &self,
        label: &str,
        net: &mut Network,
        trainer: &Trainer,
        loss: &LossSince,
        tracked: &T,
    ) -> Result<()> {
        if !self.writes() {
            return Ok(());
        }
        let d = self.ensure_run_dir(label)?;
        let path = d.join(CHECKPOINT_FILE);
        let (entries, training) = training_entries(net, trainer, loss);
        let meta = CheckpointMeta {
            version: VERSION,
            training,
            tracked: tracked.save(),
        };
        let mut metadata = checkpoint::model_metadata(net);
        metadata.insert(
            META_KEY.to_string(),
            serde_json::to_string(&meta).map_err(|e| Error::checkpoint(&path, e.to_string()))?,
        );
        checkpoint::write_entries(&path, &entries, metadata)
    }

    /// Continue run `label` from its checkpoint, if it has one: `net` and `trainer` (built as
    /// for a fresh run) and `tracked` get the saved state; returns the loss since the last
    /// evaluation. `None`: no checkpoint, start fresh.
    pub fn resume_run<T: Tracked + ?Sized>(
        &self,
        label: &str,
        net: &mut Network,
        trainer: &mut Trainer,
        tracked: &mut T,
    ) -> Result<Option<LossSince>> {
        let path = self.run_dir(label).join(CHECKPOINT_FILE);
        if !path.is_file() {
            return Ok(None);
        }
        let file = TensorFile::read(&path)?;
        let text = file.metadata.get(META_KEY).ok_or_else(|| {
            Error::checkpoint(
                &path,
                format!("not a study run checkpoint (no '{META_KEY}')"),
            )
        })?;
        let meta: CheckpointMeta<T::Saved> = serde_json::from_str(text)
            .map_err(|e| Error::checkpoint(&path, format!("unreadable run state: {e}")))?;
        if meta.version != VERSION {
            return Err(Error::checkpoint(
                &path,
                format!("version {} (this bnlab reads {VERSION})", meta.version),
            ));
        }
        let loss = restore_training(net, trainer, &file, &path, &meta.training)?;
        tracked.restore(meta.tracked);
        Ok(Some(loss))
    }

    /// Train run `label` up to `steps` with the one training loop ([`train_loop`]), evaluating
    /// every `eval_every` steps through `tracked`, writing the checkpoint every
    /// `checkpoint_every` steps (0: never periodically) and after the step at which a stop is
    /// requested; then the loop returns `Error::Stopped`. `loss` is the mean loss so far of the
    /// current evaluation interval (from [`Study::resume_run`], else the default).
    #[allow(clippy::too_many_arguments)]
    pub fn train_run<T: Tracked + ?Sized>(
        &self,
        label: &str,
        net: &mut Network,
        trainer: &mut Trainer,
        data: &Dataset,
        steps: usize,
        eval_every: usize,
        checkpoint_every: usize,
        loss: &mut LossSince,
        tracked: &mut T,
    ) -> Result<()> {
        let mut observer = Checkpointing {
            study: self,
            label,
            every: checkpoint_every,
            steps,
            tracked,
            agreed_stop: None,
        };
        train_loop(net, trainer, data, steps, eval_every, loss, &mut observer)
    }
}

/// The study's side of the loop around the tracker's: checkpoints and the stop request.
struct Checkpointing<'a, T: Tracked + ?Sized> {
    study: &'a Study,
    label: &'a str,
    every: usize,
    steps: usize,
    tracked: &'a mut T,
    /// In a data-parallel run: the stop decision agreed over the ranks after the last step
    /// (a signal landing on one rank after the agreement waits for the next step's).
    agreed_stop: Option<bool>,
}

impl<T: Tracked + ?Sized> Observer for Checkpointing<'_, T> {
    fn evaluate(&mut self, net: &mut Network, step: usize, mean_loss: f64) -> Result<()> {
        self.tracked.evaluate(net, step, mean_loss)
    }

    fn after_step(
        &mut self,
        net: &mut Network,
        trainer: &Trainer,
        loss: f64,
        since: &LossSince,
        evaluated: bool,
    ) -> Result<()> {
        self.tracked
            .after_step(net, trainer, loss, since, evaluated)?;
        let step = trainer.step;
        let stop = if net.dist().is_some() {
            // Ranks see a signal at different steps: they stop together, after the first
            // step after which any of them has seen one.
            let s = self.study.agree_stop();
            self.agreed_stop = Some(s);
            s
        } else {
            self.study.stop.requested()
        };
        // The last step too: what follows it (Algorithm 2 over the training set, the final
        // evaluations) can take long, and a stop or kill there resumes from here.
        let due = (self.every > 0 && step.is_multiple_of(self.every)) || stop || step == self.steps;
        if due {
            self.study
                .save_checkpoint(self.label, net, trainer, since, &*self.tracked)?;
        }
        Ok(())
    }

    fn stop_requested(&self) -> bool {
        self.agreed_stop
            .unwrap_or_else(|| self.study.stop.requested())
            || self.tracked.stop_requested()
    }
}

/// A run of a study as [`run_jobs`] reports it: finished now or earlier.
pub struct JobDone<'a, R> {
    /// The run's index in the study's job list.
    pub index: usize,
    /// Its result.
    pub result: &'a R,
    /// Taken from an earlier invocation's folder.
    pub resumed: bool,
    /// Runs finished so far (this one included).
    pub finished: usize,
    /// Runs in the study.
    pub total: usize,
}

/// The cores the studies share out among their runs; 0 until the command line sets it.
static CORES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Give the studies `cores` cores (the command line passes its thread count: `--threads`,
/// `$BNLAB_THREADS` or every core). Until this is called a study runs its configured number of
/// runs at a time (`workers`), one thread each. Results do not depend on it: runs are
/// independent, and a network computes the same bits on any thread count.
pub fn set_cores(cores: usize) {
    CORES.store(cores, std::sync::atomic::Ordering::Relaxed);
}

/// How a study of `runs` runs, configured for `workers` at a time, shares the cores: (runs at a
/// time, threads per run). With the cores set: one run per core while there are more runs than
/// cores, else the cores split evenly among all the runs.
pub fn share_cores(workers: usize, runs: usize) -> (usize, usize) {
    let cores = CORES.load(std::sync::atomic::Ordering::Relaxed);
    if cores == 0 {
        return (workers.min(runs).max(1), 1);
    }
    let at_once = cores.min(runs).max(1);
    (at_once, (cores / at_once).max(1))
}

/// The runs of a study, each independent, on `workers` threads: runs already finished in
/// `study` (by key, `keys[i]`) are read back; the others are taken in `order` (indices into
/// `keys`), run by `run(i)` and kept in the study (`Study::finish`). A stop request ends the
/// runs in training after their current step (their checkpoints written by `run`) and starts
/// no new one; the result is then `Error::Stopped`. The first error other than a stop ends the
/// study. Results in job order. `what` names the study in errors.
pub fn run_jobs<R>(
    study: &Study,
    what: &str,
    keys: &[String],
    order: &[usize],
    workers: usize,
    run: &(dyn Fn(usize) -> Result<R> + Sync),
    on_done: &(dyn Fn(JobDone<'_, R>) + Sync),
) -> Result<Vec<R>>
where
    R: Serialize + DeserializeOwned + Send,
{
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let total = keys.len();
    let finished = AtomicUsize::new(0);
    let mut results: Vec<Option<R>> = (0..total).map(|_| None).collect();
    for (i, key) in keys.iter().enumerate() {
        if let Some(r) = study.result::<R>(key)? {
            let n = finished.fetch_add(1, Ordering::Relaxed) + 1;
            on_done(JobDone {
                index: i,
                result: &r,
                resumed: true,
                finished: n,
                total,
            });
            results[i] = Some(r);
        }
    }
    let todo: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| i < total && results[i].is_none())
        .collect();
    if study.dist().is_some() {
        // A data-parallel study: one run at a time on this thread (the one that calls MPI),
        // every rank the same run, the stop agreed before each.
        for &i in &todo {
            if study.agree_stop() {
                break;
            }
            match run(i).and_then(|r| study.finish(&keys[i], &r).map(|()| r)) {
                Ok(res) => {
                    let n = finished.fetch_add(1, Ordering::Relaxed) + 1;
                    on_done(JobDone {
                        index: i,
                        result: &res,
                        resumed: false,
                        finished: n,
                        total,
                    });
                    results[i] = Some(res);
                }
                Err(e) => return Err(e),
            }
        }
        if results.iter().any(Option::is_none) {
            return Err(Error::Stopped { step: 0 });
        }
        return Ok(results.into_iter().flatten().collect());
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: std::sync::Mutex<Vec<Option<Result<R>>>> =
        std::sync::Mutex::new((0..total).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..workers.min(todo.len()) {
            s.spawn(|| loop {
                if failed.load(Ordering::Relaxed) || study.stop.requested() {
                    break;
                }
                let Some(&i) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let r = run(i).and_then(|r| study.finish(&keys[i], &r).map(|()| r));
                match &r {
                    Ok(res) => {
                        let n = finished.fetch_add(1, Ordering::Relaxed) + 1;
                        on_done(JobDone {
                            index: i,
                            result: res,
                            resumed: false,
                            finished: n,
                            total,
                        });
                    }
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
        .map_err(|_| Error::config(what, "a training thread panicked"))?;
    let mut stopped = None;
    for (i, slot) in slots.into_iter().enumerate() {
        match slot {
            Some(Ok(r)) => results[i] = Some(r),
            Some(Err(Error::Stopped { step })) => stopped = Some(step),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    if study.stop.requested() && results.iter().any(Option::is_none) {
        return Err(Error::Stopped {
            step: stopped.unwrap_or(0),
        });
    }
    results
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.ok_or_else(|| Error::config(what, format!("run {} did not report", keys[i])))
        })
        .collect()
}

/// Make `net` a replica of the data-parallel run `d` for a study's batches of `batch` (the
/// `command` names the study in errors): refuses slices that would leave BN fewer than 2
/// examples per process (1 for other networks), and layers that cannot train data-parallel on
/// this split (ghost batches straddling two processes).
pub(crate) fn join_replica(net: &mut Network, batch: usize, d: &Dist, command: &str) -> Result<()> {
    let p = d.comm.size();
    let least = if net.has_batch_norm() { 2 * p } else { p };
    if batch < least {
        return Err(Error::config(
            command,
            format!(
                "batches of {batch} over {p} processes: {} needs at least {least} (at least {} \
                 example(s) per process); run the study on fewer processes or without mpirun",
                net.name(),
                least / p
            ),
        ));
    }
    net.set_dist(Some(d.clone()))
        .and_then(|()| net.check_split(batch))
        .map_err(|e| {
            Error::config(
                command,
                format!(
                    "the run {} cannot train data-parallel ({e}); run the study without mpirun",
                    net.name()
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_file_names() {
        assert_eq!(run_key("BN-x30 seed 2"), "BN-x30_seed_2");
        assert_eq!(run_key("Inception lr 0.08"), "Inception_lr_0.08");
        assert_eq!(run_key("a/b\\c"), "a_b_c");
    }

    #[test]
    fn create_refuses_a_study_and_open_checks_the_kind() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("s");
        let s = Study::create(&d, "mnist", serde_json::json!({"steps": 5}), None).unwrap();
        assert!(!s.is_finished("a"));
        s.finish("a", &vec![0.1f64, 1.0 / 3.0]).unwrap();
        assert!(s.is_finished("a"));
        let back: Vec<f64> = s.result("a").unwrap().unwrap();
        assert_eq!(back, vec![0.1, 1.0 / 3.0]);
        s.save_floats("a", "p", &[1.5, -0.25]).unwrap();
        assert_eq!(s.load_floats("a", "p").unwrap(), Some(vec![1.5, -0.25]));
        let err = Study::create(&d, "mnist", serde_json::json!({}), None)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--resume"), "{err}");
        let err = Study::open(&d, "inception").err().unwrap().to_string();
        assert!(err.contains("holds a `mnist` study"), "{err}");
        let s = Study::open(&d, "mnist").unwrap();
        let setup: serde_json::Value = s.setup().unwrap();
        assert_eq!(setup["steps"], 5);
        let err = Study::open(&t.path().join("none"), "mnist")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no study"), "{err}");
    }
}
