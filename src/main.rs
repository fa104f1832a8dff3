//! The `bnlab` command line: parse, validate, call the library, print. Errors become one line
//! on stderr and a non-zero exit status.

mod cli;

use bnlab::checkpoint;
use bnlab::data::{self, Split};
use bnlab::dist::BnSync;
use bnlab::experiments::inception::{self, InceptionSetup};
use bnlab::experiments::mnist::{self, MnistSetup, Progress};
use bnlab::kernels::batch_norm::RunningAverage;
use bnlab::model::{self, ModelSpec};
use bnlab::network::Network;
use bnlab::nn::{ConvAlgo, InferenceStats, RenormSchedule};
use bnlab::optim::Schedule;
use bnlab::report;
use bnlab::run::{self, Event, Run, RunSpec};
use bnlab::study::Study;
use bnlab::train::{
    population_statistics, train_loop, BnTraining, Evaluator, FreezeBn, LossSince, Observer, Order,
    TrainConfig, Trainer,
};
use bnlab::{Error, Result};
use clap::{Args, Parser, Subcommand};
use cli::progress::{fmt_duration, fmt_rate, RunUpdate};
use cli::{shell_word, Ranks, Reporter, RunControl, StudyMeter};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "bnlab",
    version,
    about = "Batch Normalization (Ioffe & Szegedy 2015) on CPU: train networks (presets or model \
             files) on MNIST, Fashion-MNIST, CIFAR-10 or .npz data, evaluate, fold, export, and \
             reproduce the paper's experiments",
    after_help = "Example: bnlab reproduce mnist --data ../shared/datasets/mnist --out runs/mnist\n\
                  `bnlab COMMAND --help` describes each command, with an example."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a network (a preset or a model file) on a data set: MNIST-layout IDX files
    /// (MNIST, Fashion-MNIST), CIFAR-10 or a .npz archive.
    ///
    /// Progress shows the rate and an ETA (a bar on a terminal, else one line per evaluation;
    /// --progress json for tools). With --out the run keeps its state in RUN_DIR; Ctrl-C (or
    /// SIGTERM) stops after the current step, writes the state and prints the command that
    /// resumes it (exit status 130; 143 for SIGTERM); a second Ctrl-C stops at once.
    ///
    /// Example: bnlab train --model resnet20-bn --data /usr/share/datasets/fashion-mnist --steps 2000 --batch-size 128 --lr 0.05 --momentum 0.9 --out runs/r20
    Train(Box<TrainArgs>),
    /// Evaluate a checkpoint on a data set's test split (running or population BN statistics).
    ///
    /// Example: bnlab eval --model mlp-fig1-bn --weights runs/r/final.safetensors --data ../shared/datasets/mnist --bn-stats population
    Eval(EvalArgs),
    /// Measure training steps per second of the training loop alone.
    ///
    /// Example: bnlab bench --model mlp-fig1-bn --data ../shared/datasets/mnist --steps 5000 --threads 2
    Bench(BenchArgs),
    /// Fold each BN into the Conv2d or Linear before it (a checkpoint of the network without BN).
    ///
    /// Example: bnlab fold --model mlp-fig1-bn --weights runs/r/final.safetensors --save folded.safetensors
    Fold(FoldArgs),
    /// Export a network in inference mode (ONNX).
    ///
    /// Example: bnlab export --model mlp-fig1-bn --weights runs/r/final.safetensors --format onnx --out net.onnx
    Export(ExportArgs),
    /// List the preset networks, or print one's model file (`models show NAME`).
    ///
    /// Example: bnlab models show resnet20-bn > my-net.json
    Models(ModelsArgs),
    /// Print a network's layers: path, output shape, parameters, multiply-adds per example
    /// (the data's example shape fixes an input the model file leaves open).
    ///
    /// Example: bnlab summary --model resnet20-bn --data /usr/share/datasets/fashion-mnist
    Summary(SummaryArgs),
    /// Loss and gradient of every parameter for one mini-batch (training mode), as safetensors.
    ///
    /// Example: bnlab grad --model mlp-fig1-bn --weights w.safetensors --data ../shared/datasets/mnist --batch-size 60 --save grad.safetensors
    Grad(GradArgs),
    /// Internal covariate shift (Santurkar et al. 2018, Definition 2.1) at every Linear and
    /// Conv2d layer on one mini-batch: how the layer's gradient changes when every parameter
    /// before it takes an SGD step.
    ///
    /// Example: bnlab ics --model mlp-fig1-bn --weights w.safetensors --data ../shared/datasets/mnist --batch-size 60 --lr 0.1
    Ics(IcsArgs),
    /// The loss landscape along the gradient of one mini-batch: loss, gradient change and
    /// effective beta-smoothness at each step size.
    ///
    /// Example: bnlab landscape --model mlp-fig1-bn --weights w.safetensors --data ../shared/datasets/mnist --batch-size 60 --etas 0.05,0.1,0.2,0.4
    Landscape(LandscapeArgs),
    /// Reproduce one of the paper's experiments (a study of several training runs).
    ///
    /// A study keeps its progress in its output folder (finished runs' results, running runs'
    /// checkpoints): Ctrl-C stops it after the current step and prints the command that
    /// resumes it (`--resume DIR`); `--report-only DIR` writes the report of a study stopped
    /// halfway, marking the missing runs.
    ///
    /// Under `mpirun -n P` every study trains each of its runs data-parallel on the P
    /// processes (one run at a time; rank 0 writes the study; it resumes only on P processes).
    /// A normalizers run whose batch leaves BN fewer than 2 examples per process is skipped,
    /// and the report says so.
    ///
    /// Example: bnlab reproduce mnist --data ../shared/datasets/mnist --out runs/mnist
    Reproduce {
        #[command(subcommand)]
        study: StudyCommand,
    },
}

#[derive(Subcommand)]
enum StudyCommand {
    /// Section 4.1, Figure 1: the sigmoid MLP (mlp-fig1, mlp-fig1-bn) on MNIST, without and
    /// with BN, trained side by side (about 20 s on 2 cores).
    ///
    /// Writes results.json, timings.json, metrics.csv, summary.md and fig1.svg/png into --out.
    ///
    /// Under `mpirun -n P` (the `mpi` feature) each run trains data-parallel on the P
    /// processes, one run after the other, with `--bn-sync` (default global: the same study
    /// up to rounding); rank 0 alone prints and writes; the study resumes only on P processes.
    ///
    /// Example: bnlab reproduce mnist --data ../shared/datasets/mnist --out runs/mnist
    /// (stopped? bnlab reproduce mnist --resume runs/mnist)
    Mnist(ReproduceArgs),
    /// Where BN breaks (small and non-i.i.d. batches) and the normalizers that answer it:
    /// BN, batch renorm, group norm, layer norm and none on vgg-mini-bn with Fashion-MNIST.
    ///
    /// Under `mpirun -n P` each run trains data-parallel (global BN sync), one after the
    /// other; the BN and batch-renorm runs whose batch leaves fewer than 2 examples per process
    /// (batch 2 on 2 processes) are skipped, with the reason in results.json and summary.md.
    ///
    /// Example: bnlab reproduce normalizers --quick --out runs/normalizers-quick
    Normalizers(NormalizersArgs),
    /// Section 4.2, Figures 2-4: inception-mini on Fashion-MNIST with and without BN, at the
    /// baseline's best learning rate (from a sweep) and 5x / 30x it, and a BN-x30 ensemble
    /// (17 runs, about 23 minutes on 2 cores; --quick: under a minute).
    ///
    /// Under `mpirun -n P` each run trains data-parallel (global BN sync; dropout draws the
    /// global batch's mask on every process), one after the other; rank 0 alone writes.
    ///
    /// Example: bnlab reproduce inception --quick --out runs/inception-quick
    /// (stopped? bnlab reproduce inception --resume runs/inception-quick)
    Inception(InceptionArgs),
    /// Why BN works (Santurkar et al. 2018): vgg-mini on Fashion-MNIST and the Figure 1 MLP on
    /// MNIST, each without BN, with BN and with noisy BN; test accuracy, the stability of a
    /// layer's inputs, internal covariate shift and the loss landscape over training, and
    /// their claims checked.
    ///
    /// Under `mpirun -n P` each run trains data-parallel (global BN sync; noisy BN draws the
    /// global batch's noise on every process), one after the other; the measurements (ICS,
    /// the landscape) run whole on every process.
    ///
    /// Example: bnlab reproduce ics --quick --out runs/ics-quick
    /// (stopped? bnlab reproduce ics --resume runs/ics-quick)
    Ics(IcsStudyArgs),
    /// Wu & Johnson 2021: EMA against population statistics (PreciseBN) at inference, over
    /// the training of vgg-mini-bn at a normal and a high learning rate, and how many samples
    /// the population statistics need.
    ///
    /// Under `mpirun -n P` each run trains data-parallel on the P processes (global BN sync),
    /// one run after the other; rank 0 alone prints and writes.
    ///
    /// Example: bnlab reproduce precise-bn --quick --out runs/precise-bn-quick
    /// (stopped? bnlab reproduce precise-bn --resume runs/precise-bn-quick)
    PreciseBn(PreciseBnArgs),
}

#[derive(Args, Clone)]
struct DataArgs {
    /// The data: a directory in the MNIST layout (IDX files: MNIST, Fashion-MNIST, ...), a
    /// directory of CIFAR-10's binary version (data_batch_1.bin ..), or a NumPy .npz file
    /// (x_train, y_train, x_test, y_test). Default: --dataset's place.
    #[arg(long, value_name = "DIR|FILE")]
    data: Option<PathBuf>,
    /// A named data set at its default place ($BNLAB_DATA/NAME, else ./data/NAME): mnist,
    /// fashion-mnist (also /usr/share/datasets/fashion-mnist) or cifar10; mnist and cifar10
    /// are downloaded (checksum-verified) when missing. Default: the one the model file
    /// names, else mnist.
    #[arg(long, value_name = "NAME")]
    dataset: Option<String>,
    /// Never download missing data files.
    #[arg(long)]
    no_download: bool,
}

/// `--norm`, shared by the commands that build a network.
#[derive(Args, Clone)]
struct NormArgs {
    /// Replace every BatchNorm of the model, under the same module names: bn (as the model
    /// has it), gn:G (group norm, G groups), ln (layer norm), brn[:RMAX:DMAX] (batch
    /// renormalization, default 3 and 5), ghost:G (ghost batches of G examples), noisy-bn (BN
    /// followed by Santurkar et al.'s noise in training), none (no normalization: the layer
    /// before each BatchNorm gets a bias).
    #[arg(
        long,
        default_value = "bn",
        value_name = "bn|gn:G|ln|brn|ghost:G|noisy-bn|none"
    )]
    norm: String,
}

impl NormArgs {
    /// The model named by `--model`, with `--norm` applied.
    fn model(&self, name_or_path: &str) -> Result<ModelSpec> {
        model::apply_norm(
            &model::resolve(name_or_path)?,
            model::NormChoice::parse(&self.norm)?,
        )
    }
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct TrainArgs {
    /// A preset (see `bnlab models`) or the path of a model file (docs/models.md).
    #[arg(long, value_name = "PRESET|FILE")]
    model: Option<String>,
    /// Continue the run saved in RUN_DIR with its original settings.
    /// (The run's settings are its own: training flags given with it are refused.)
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = [
        "model", "out", "init", "steps", "batch_size", "lr", "momentum", "weight_decay",
        "schedule", "seed", "order", "eval_every", "checkpoint_every", "bn_momentum", "threads",
        "save", "normalize", "augment", "norm", "freeze_bn", "renorm_schedule", "bn_sync",
        "conv",
    ])]
    resume: Option<PathBuf>,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    norm: NormArgs,
    /// Frozen BN, as in fine-tuning: every BatchNorm normalizes with fixed statistics in
    /// training too (gamma and beta still learn): `running` (those of --init; the default
    /// when the flag is given alone) or `population` (Algorithm 2 over the training set with
    /// the starting weights, computed before the first step).
    #[arg(long, value_name = "running|population", num_args = 0..=1, default_missing_value = "running")]
    freeze_bn: Option<String>,
    /// Batch renormalization's schedule (with --norm brn or renorm layers), as fractions of
    /// the run: r = 1 and d = 0 until WARMUP, then rmax and dmax rise linearly to their final
    /// values at R_END and D_END.
    #[arg(long, default_value = "0.1,0.8,0.5", value_name = "WARMUP,R_END,D_END")]
    renorm_schedule: String,
    #[arg(long, default_value_t = 50_000)]
    steps: i64,
    #[arg(long, default_value_t = 60)]
    batch_size: i64,
    #[arg(long, default_value_t = 0.1)]
    lr: f64,
    #[arg(long, default_value_t = 0.0)]
    momentum: f32,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Learning-rate schedule: constant, step:EVERY:GAMMA or exp:EVERY:GAMMA.
    #[arg(long, default_value = "constant")]
    schedule: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// shuffle (reshuffled every epoch), sequential (batch k = examples kB..(k+1)B-1), or
    /// grouped:K (non-i.i.d. batches: K pieces of B/K examples of one class each).
    #[arg(long, default_value = "shuffle")]
    order: String,
    /// Start from this checkpoint (safetensors, PyTorch state_dict names).
    #[arg(long, value_name = "FILE")]
    init: Option<PathBuf>,
    /// Write the final checkpoint here.
    #[arg(long, value_name = "FILE")]
    save: Option<PathBuf>,
    /// Evaluate on the test set every K steps (0: only at the end).
    #[arg(long, default_value_t = 1000)]
    eval_every: i64,
    /// Run directory: the run state (every --checkpoint-every steps, atomically),
    /// latest.safetensors, metrics.csv, and final.safetensors at the end.
    #[arg(long, value_name = "RUN_DIR")]
    out: Option<PathBuf>,
    /// Checkpoint the run state every K steps (0: only at the end).
    #[arg(long, default_value_t = 1000, value_name = "K")]
    checkpoint_every: i64,
    /// Running averages of BN statistics: PyTorch's momentum, or `cumulative` (the plain
    /// average over all batches, PyTorch's momentum=None). Default: each BatchNorm's
    /// momentum in the model file (0.1 unless it says otherwise).
    #[arg(long, value_name = "X|cumulative")]
    bn_momentum: Option<String>,
    /// Threads for the kernels (default: every core: $BNLAB_THREADS if set, else the cores
    /// available to the process, shared among the ranks of this host under mpirun). Without
    /// either, the steps move to fewer threads while that runs faster (as when the host runs
    /// this machine's CPUs badly) and back when it no longer does; results are the same.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Input normalization per channel: none, auto (the training set's mean and standard
    /// deviation), or MEAN,STD[;MEAN,STD...]; recorded in the checkpoints, so eval, fold and
    /// export apply the same.
    #[arg(long, default_value = "none", value_name = "none|auto|MEAN,STD[;..]")]
    normalize: String,
    /// Augmentation of training batches: none, or crop-flip (random crop after 4-pixel zero
    /// padding, and horizontal flip: the standard CIFAR recipe); deterministic for a seed.
    #[arg(long, default_value = "none", value_name = "none|crop-flip")]
    augment: String,
    #[command(flatten)]
    sync: SyncArgs,
    #[command(flatten)]
    conv: ConvArgs,
    #[command(flatten)]
    control: RunControl,
}

/// Data-parallel settings (under `mpirun -n P`, with the `mpi` feature).
#[derive(Args)]
struct SyncArgs {
    /// Under mpirun -n P: global (every BatchNorm's statistics over the whole batch, reduced
    /// over the P processes: the same training as one process) or local (each process
    /// normalizes its own slice: ghost BN with the slice as virtual batch). Ignored in one
    /// process.
    #[arg(long, default_value = "global", value_name = "global|local")]
    bn_sync: String,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct EvalArgs {
    /// A preset (see `bnlab models`) or the path of a model file.
    #[arg(long, value_name = "PRESET|FILE")]
    model: String,
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    norm: NormArgs,
    /// running (averages kept in training) or population (the paper's Algorithm 2, computed
    /// here by a pass over the training set).
    #[arg(long, default_value = "running")]
    bn_stats: String,
    /// Mini-batch size of Algorithm 2's pass (--bn-stats population). Default: the batch
    /// size the checkpoint was trained with (recorded in its metadata), else 60.
    #[arg(long, value_name = "B")]
    population_batch_size: Option<i64>,
    /// Print a JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Threads for the kernels (default: every core: $BNLAB_THREADS if set, else the cores
    /// available to the process, shared among the ranks of this host under mpirun).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Args)]
struct FoldArgs {
    /// A network with BN: a preset (see `bnlab models`) or the path of a model file.
    #[arg(long, value_name = "PRESET|FILE")]
    model: String,
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    /// Where to write the folded checkpoint (a preset's when the network without BN is one,
    /// e.g. mlp-fig1-bn -> mlp-fig1; the model file rides in its metadata either way).
    #[arg(long, value_name = "OUT")]
    save: PathBuf,
    /// Inference statistics to fold: running, or population (Algorithm 2 over the training
    /// set, which needs the data).
    #[arg(long, default_value = "running")]
    bn_stats: String,
    /// Mini-batch size of Algorithm 2's pass (--bn-stats population). Default: the batch
    /// size the checkpoint was trained with (recorded in its metadata), else 60.
    #[arg(long, value_name = "B")]
    population_batch_size: Option<i64>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
struct ExportArgs {
    /// A preset (see `bnlab models`) or the path of a model file.
    #[arg(long, value_name = "PRESET|FILE")]
    model: String,
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    /// Only onnx.
    #[arg(long, default_value = "onnx")]
    format: String,
    #[arg(long, value_name = "FILE.onnx")]
    out: PathBuf,
    /// Inference statistics for BN: running, or population (needs the data).
    #[arg(long, default_value = "running")]
    bn_stats: String,
    /// Mini-batch size of Algorithm 2's pass (--bn-stats population). Default: the batch
    /// size the checkpoint was trained with (recorded in its metadata), else 60.
    #[arg(long, value_name = "B")]
    population_batch_size: Option<i64>,
    #[command(flatten)]
    data: DataArgs,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct BenchArgs {
    /// A preset (see `bnlab models`) or the path of a model file.
    #[arg(long, value_name = "PRESET|FILE")]
    model: String,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    norm: NormArgs,
    #[arg(long, default_value_t = 5000)]
    steps: i64,
    #[arg(long, default_value_t = 60)]
    batch_size: i64,
    /// Threads for the kernels (default: every core: $BNLAB_THREADS if set, else the cores
    /// available to the process, shared among the ranks of this host under mpirun). Without
    /// either, the steps move to fewer threads while that runs faster (as when the host runs
    /// this machine's CPUs badly) and back when it no longer does; results are the same.
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    #[command(flatten)]
    sync: SyncArgs,
    #[command(flatten)]
    conv: ConvArgs,
    #[arg(long)]
    json: bool,
}

/// How the convolutions compute their 3x3 same-size products (`train`, `bench`, `eval`).
#[derive(Args, Clone, Debug)]
struct ConvArgs {
    /// winograd (default: Winograd's F(2x2, 3x3) for the 3x3, stride-1 convolutions with 4 or
    /// more input channels, forward pass and both gradients: the fastest; equal to direct up
    /// to rounding) or direct (the lowered product, the arithmetic of the reproductions).
    #[arg(
        id = "conv",
        long = "conv",
        value_name = "winograd|direct",
        default_value = "winograd"
    )]
    algo: String,
}

impl ConvArgs {
    fn algo(&self) -> Result<ConvAlgo> {
        ConvAlgo::parse(&self.algo).ok_or_else(|| {
            Error::config(
                "--conv",
                format!("`{}` is not an algorithm (winograd or direct)", self.algo),
            )
        })
    }
}

/// Continuing or reporting on a study kept in a directory (every `reproduce`).
#[derive(Args, Clone, Debug)]
struct StudyDirArgs {
    /// Continue the study kept in DIR (stopped by Ctrl-C, SIGTERM or a kill) with its own
    /// settings; finished runs are not redone, and the results are those of an uninterrupted
    /// study.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["out", "report_only"])]
    resume: Option<PathBuf>,
    /// Write the report of the study kept in DIR from the runs that finished (a study stopped
    /// halfway), marking the missing runs; nothing is trained.
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    report_only: Option<PathBuf>,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct ReproduceArgs {
    #[command(flatten)]
    data: DataArgs,
    /// Training steps of each net.
    #[arg(long, default_value_t = 50_000, conflicts_with_all = ["resume", "report_only"])]
    steps: i64,
    /// The study's folder: its progress, then its report.
    #[arg(long, default_value = "runs/mnist", value_name = "DIR")]
    out: PathBuf,
    /// Evaluate (and checkpoint) every K steps.
    #[arg(long, default_value_t = 500, value_name = "K", conflicts_with_all = ["resume", "report_only"])]
    eval_every: i64,
    #[arg(long, default_value_t = 0.1, conflicts_with_all = ["resume", "report_only"])]
    lr: f64,
    #[arg(long, default_value_t = 1, conflicts_with_all = ["resume", "report_only"])]
    seed: u64,
    /// Replace every BatchNorm of the BN networks: gn:G, ln, brn[:RMAX:DMAX], ghost:G, noisy-bn
    /// or none (default: bn, the paper's batch normalization).
    #[arg(long, value_name = "bn|gn:G|ln|brn|ghost:G|noisy-bn|none", conflicts_with_all = ["resume", "report_only"])]
    norm: Option<String>,
    /// Under mpirun -n P: global (default: every BatchNorm's statistics over the whole batch,
    /// reduced over the P processes, the same training as one process) or local (each process
    /// normalizes its own slice). Ignored in one process; a resumed study keeps its own.
    #[arg(long, value_name = "global|local", conflicts_with = "report_only")]
    bn_sync: Option<String>,
    #[command(flatten)]
    study: StudyDirArgs,
    #[command(flatten)]
    control: RunControl,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct InceptionArgs {
    /// Fashion-MNIST directory (default: $BNLAB_DATA/fashion-mnist, else
    /// /usr/share/datasets/fashion-mnist; never downloaded).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The whole path in under a minute: 100 steps per run, two ensemble members.
    #[arg(long, conflicts_with_all = ["resume", "report_only"])]
    quick: bool,
    /// The study's folder: its progress, then its report.
    #[arg(long, default_value = "runs/inception", value_name = "DIR")]
    out: PathBuf,
    /// Training steps of every run (default 4500; --quick 100).
    #[arg(long, conflicts_with_all = ["resume", "report_only"])]
    steps: Option<i64>,
    /// Evaluate on the test subset (and checkpoint) every K steps (default 100; --quick 20).
    #[arg(long, value_name = "K", conflicts_with_all = ["resume", "report_only"])]
    eval_every: Option<i64>,
    /// Learning rates of the no-BN sweep, comma-separated (default 0.01,0.02,...,0.32).
    #[arg(long, value_name = "LIST", conflicts_with_all = ["resume", "report_only"])]
    sweep: Option<String>,
    /// BN-x30 networks in the ensemble (default 6; --quick 2).
    #[arg(long, conflicts_with_all = ["resume", "report_only"])]
    members: Option<i64>,
    #[arg(long, default_value_t = 1, conflicts_with_all = ["resume", "report_only"])]
    seed: u64,
    /// Replace every BatchNorm of the BN networks: gn:G, ln, brn[:RMAX:DMAX], ghost:G, noisy-bn
    /// or none (default: bn, the paper's batch normalization).
    #[arg(long, value_name = "bn|gn:G|ln|brn|ghost:G|noisy-bn|none", conflicts_with_all = ["resume", "report_only"])]
    norm: Option<String>,
    #[command(flatten)]
    study: StudyDirArgs,
    #[command(flatten)]
    control: RunControl,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct NormalizersArgs {
    /// Fashion-MNIST directory (default: $BNLAB_DATA/fashion-mnist, else
    /// /usr/share/datasets/fashion-mnist; never downloaded).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The whole path in a minute or two: 6,000 training examples per run.
    #[arg(long, conflicts_with_all = ["resume", "report_only"])]
    quick: bool,
    /// The study's folder: its progress, then its report.
    #[arg(long, default_value = "runs/normalizers", value_name = "DIR")]
    out: PathBuf,
    /// Training examples every run sees (default 120,000; --quick 6,000).
    #[arg(long, conflicts_with_all = ["resume", "report_only"])]
    examples: Option<i64>,
    #[arg(long, default_value_t = 1, conflicts_with_all = ["resume", "report_only"])]
    seed: u64,
    #[command(flatten)]
    study: StudyDirArgs,
}

#[derive(Args)]
struct IcsStudyArgs {
    /// Fashion-MNIST directory (default: $BNLAB_DATA/fashion-mnist, else
    /// /usr/share/datasets/fashion-mnist; never downloaded).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// MNIST directory (default: $BNLAB_DATA/mnist, else ./data/mnist; downloaded there with
    /// checksums when missing).
    #[arg(long, value_name = "DIR")]
    mnist: Option<PathBuf>,
    /// The whole path in a minute or two: 200 steps of the VGG net, 2,000 of the MLP.
    #[arg(long, conflicts_with_all = ["resume", "report_only"])]
    quick: bool,
    /// The study's folder: its progress, then its report.
    #[arg(long, default_value = "runs/ics", value_name = "DIR")]
    out: PathBuf,
    #[arg(long, default_value_t = 1, conflicts_with_all = ["resume", "report_only"])]
    seed: u64,
    #[command(flatten)]
    study: StudyDirArgs,
}

#[derive(Args)]
struct ModelsArgs {
    #[command(subcommand)]
    action: Option<ModelsAction>,
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Print a preset's model file, to copy and edit.
    Show {
        /// The preset's name.
        name: String,
    },
}

#[derive(Args)]
struct SummaryArgs {
    /// A preset (see `bnlab models`) or the path of a model file.
    #[arg(long, value_name = "PRESET|FILE")]
    model: String,
    /// Data whose example shape fixes an input the model file leaves open (resnet20*);
    /// without it, such a model is shown on 1x28x28.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// Never download missing data files.
    #[arg(long)]
    no_download: bool,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct GradArgs {
    /// A preset (see `bnlab models`) or the path of a model file.
    #[arg(long, value_name = "PRESET|FILE")]
    model: String,
    /// The parameters (safetensors, PyTorch state_dict names).
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    norm: NormArgs,
    #[arg(long)]
    batch_size: i64,
    /// First training example of the batch (examples K .. K+B-1 in file order).
    #[arg(long, default_value_t = 0, value_name = "K")]
    offset: i64,
    /// Where to write the gradients (safetensors: one tensor per parameter, plus `loss`).
    #[arg(long, value_name = "OUT")]
    save: PathBuf,
    /// Print a JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Threads for the kernels (default: every core: $BNLAB_THREADS if set, else the cores
    /// available to the process, shared among the ranks of this host under mpirun).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

/// What `ics` and `landscape` measure on: a checkpoint and one mini-batch.
#[derive(Args)]
struct ProbeArgs {
    /// A preset (see `bnlab models`) or the path of a model file.
    #[arg(long, value_name = "PRESET|FILE")]
    model: String,
    /// The parameters (safetensors, PyTorch state_dict names).
    #[arg(long, value_name = "FILE")]
    weights: PathBuf,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    norm: NormArgs,
    /// Examples in the mini-batch (B).
    #[arg(long, value_name = "B")]
    batch_size: i64,
    /// First training example of the batch (examples K .. K+B-1 in file order).
    #[arg(long, default_value_t = 0, value_name = "K")]
    offset: i64,
    /// Print a JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Threads for the kernels (default: every core: $BNLAB_THREADS if set, else the cores
    /// available to the process, shared among the ranks of this host under mpirun).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct IcsArgs {
    #[command(flatten)]
    probe: ProbeArgs,
    /// The SGD step size of the parameters before each layer.
    #[arg(long, value_name = "ETA")]
    lr: f64,
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct LandscapeArgs {
    #[command(flatten)]
    probe: ProbeArgs,
    /// Step sizes along the negative gradient, comma-separated (e.g. 0.05,0.1,0.2,0.4).
    #[arg(long, value_name = "E1,E2,..")]
    etas: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Only the long runs stop gracefully; every other command keeps the default Ctrl-C.
    let long_run = matches!(cli.command, Command::Train(_) | Command::Reproduce { .. });
    let stop = if long_run {
        match cli::install_stop() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        bnlab::stop::Stop::new()
    };
    // Under mpirun -n P, the commands that train data-parallel run on P ranks.
    let ranks = match &cli.command {
        Command::Train(_) | Command::Bench(_) | Command::Reproduce { .. } => Ranks::start(),
        _ => Ok(Ranks::single()),
    };
    let ranks = match ranks {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    // A bad $BNLAB_SIMD is an error, as a bad $BNLAB_THREADS is: a run must use the level it
    // was asked for.
    if let Err(e) = bnlab::kernels::simd::requested() {
        eprintln!("error: {}", Error::config("$BNLAB_SIMD", e));
        return ExitCode::FAILURE;
    }
    if let Err(e) = bnlab::kernels::team::pin_requested() {
        eprintln!("error: {}", Error::config("$BNLAB_PIN", e));
        return ExitCode::FAILURE;
    }
    // The reproductions share every core among their runs (`$BNLAB_THREADS` to use fewer).
    if matches!(cli.command, Command::Reproduce { .. }) {
        match threads_used(None) {
            Ok(n) => bnlab::study::set_cores(n),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let result = match cli.command {
        Command::Train(a) => train(*a, &stop, &ranks),
        Command::Eval(a) => eval(a),
        Command::Bench(a) => bench(a, &ranks),
        Command::Fold(a) => fold_cmd(a),
        Command::Export(a) => export_cmd(a),
        Command::Models(a) => models_cmd(a),
        Command::Summary(a) => summary_cmd(a),
        Command::Grad(a) => grad_cmd(a),
        Command::Ics(a) => ics_cmd(a),
        Command::Landscape(a) => landscape_cmd(a),
        Command::Reproduce {
            study: StudyCommand::Mnist(a),
        } => reproduce_mnist(a, &stop, &ranks),
        Command::Reproduce {
            study: StudyCommand::Normalizers(a),
        } => reproduce_normalizers(a, &stop, &ranks),
        Command::Reproduce {
            study: StudyCommand::Inception(a),
        } => reproduce_inception(a, &stop, &ranks),
        Command::Reproduce {
            study: StudyCommand::Ics(a),
        } => reproduce_ics(a, &stop, &ranks),
        Command::Reproduce {
            study: StudyCommand::PreciseBn(a),
        } => reproduce_precise_bn(a, &stop, &ranks),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // The command has said where it stopped and how to resume.
        Err(Error::Stopped { .. }) => ExitCode::from(cli::stopped_status(&stop)),
        // Agreed over the ranks and said once already (`Ranks::agree`).
        Err(_) if ranks.reported() => ExitCode::FAILURE,
        Err(e) if ranks.size() == 1 => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        // Every rank met it at the same step: rank 0 says it, all end normally.
        Err(e) if Ranks::agreed(&e) => {
            if ranks.lead() {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error (rank {} of {}): {e}", ranks.rank(), ranks.size());
            ranks.abort(1);
            ExitCode::FAILURE
        }
    }
}

fn positive(name: &str, v: i64) -> Result<usize> {
    if v <= 0 {
        return Err(Error::config(
            name,
            format!("{v} (must be a positive integer)"),
        ));
    }
    Ok(v as usize)
}

/// The data set named by `--data` / `--dataset`, else the one the model file names, else
/// MNIST.
fn load_data(a: &DataArgs, spec: Option<&ModelSpec>) -> Result<Split> {
    let dataset = match (&a.data, &a.dataset) {
        (_, Some(d)) => Some(d.clone()),
        (Some(_), None) => None,
        (None, None) => spec.and_then(|s| s.dataset.clone()),
    };
    data::resolve_source(a.data.as_deref(), dataset.as_deref(), !a.no_download)
}

/// The example shape of a data set, `[C, H, W]`.
fn data_shape(split: &Split) -> Vec<usize> {
    split.train.shape().to_vec()
}

/// `p` made absolute (against the current directory), so a run resumes from anywhere.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A network of `spec` for the examples of `split`.
fn network_for(
    spec: &ModelSpec,
    split: &Split,
    seed: u64,
    max_batch: usize,
    threads: usize,
) -> Result<Network> {
    let input = model::resolve_input(spec, Some(&data_shape(split)))?;
    Network::build(spec, &input, seed, max_batch, threads)
}

fn train(a: TrainArgs, stop: &bnlab::stop::Stop, ranks: &Ranks) -> Result<()> {
    let mode = a.control.mode()?;
    let lead = ranks.lead();
    let mut run = match &a.resume {
        Some(dir) => {
            let spec = Run::read_spec(dir)?;
            let data = DataArgs {
                data: a.data.data.clone().or(spec.data.clone()),
                dataset: a.data.dataset.clone().or(spec.dataset.clone()),
                no_download: a.data.no_download,
            };
            let mut split = load_data(&data, Some(&Run::model_of(&spec)?))?;
            split.set_normalization(spec.normalization.clone())?;
            let trained_on = spec.ranks.unwrap_or(1);
            if trained_on != ranks.size() {
                return Err(Error::config(
                    "--resume",
                    format!(
                        "the run in {} was trained on {trained_on} process(es), this is {}: \
                         resume it with {}bnlab train --resume {0}",
                        dir.display(),
                        ranks.size(),
                        if trained_on > 1 {
                            format!("mpirun -n {trained_on} ")
                        } else {
                            String::new()
                        }
                    ),
                ));
            }
            let run = Run::resume(dir, &data_shape(&split), split.train.len())?;
            if lead {
                eprintln!(
                    "resuming {} at step {} of {}",
                    dir.display(),
                    run.step(),
                    run.spec.config.steps
                );
            }
            (run, split)
        }
        None => {
            let model = a
                .model
                .clone()
                .ok_or_else(|| Error::config("--model", "required (unless --resume RUN_DIR)"))?;
            let spec = a.norm.model(&model)?;
            let freeze = a.freeze_bn.as_deref().map(FreezeBn::parse).transpose()?;
            if freeze.is_some() && !spec.has_batch_norm() {
                return Err(Error::config(
                    "--freeze-bn",
                    format!("{} has no BatchNorm to freeze", spec.name),
                ));
            }
            let config = TrainConfig {
                steps: positive("--steps", a.steps)?,
                batch_size: positive("--batch-size", a.batch_size)?,
                lr: a.lr,
                momentum: a.momentum,
                weight_decay: a.weight_decay,
                schedule: Schedule::parse(&a.schedule)?,
                seed: a.seed,
                order: Order::parse(&a.order)?,
                eval_every: non_negative("--eval-every", a.eval_every)?,
                threads: threads_used(a.threads)?,
                augment: bnlab::train::Augment::parse(&a.augment)?,
                bn: BnTraining {
                    freeze,
                    renorm_schedule: RenormSchedule::parse(&a.renorm_schedule)?,
                },
            };
            config.validate(spec.has_batch_norm())?;
            let normalize = data::parse_normalize_flag(&a.normalize)?;
            let conv = a.conv.algo()?;
            if let Some(m) = &a.bn_momentum {
                RunningAverage::parse(m)?;
            }
            if let Some(p) = &a.save {
                check_writable(p)?;
            }
            let mut split = load_data(&a.data, Some(&spec))?;
            let normalization = normalize.resolve(&split.train);
            split.set_normalization(normalization.clone())?;
            let run_spec = RunSpec {
                model,
                model_json: Some(spec.to_json().to_string()),
                config,
                bn_momentum: a.bn_momentum.clone(),
                data: a.data.data.as_deref().map(absolute),
                dataset: a.data.dataset.clone(),
                normalization,
                init: a.init.clone(),
                checkpoint_every: non_negative("--checkpoint-every", a.checkpoint_every)?,
                ranks: (ranks.size() > 1).then_some(ranks.size()),
                bn_sync: (ranks.size() > 1)
                    .then(|| BnSync::parse(&a.sync.bn_sync))
                    .transpose()?,
                conv,
            };
            let run = Run::new(
                run_spec,
                a.out.clone(),
                &data_shape(&split),
                split.train.len(),
            )?;
            (run, split)
        }
    };
    let (run, split) = (&mut run.0, &run.1);
    run.stop = stop.clone();
    if threads_adaptive(a.threads) {
        run.trainer.tune_threads(run.spec.config.threads);
    }
    if ranks.size() > 1 {
        let bn_sync = run.spec.bn_sync.unwrap_or(BnSync::Global);
        // The same check on every rank: said once, every rank ending normally.
        ranks.agree(join_ranks(&mut run.net, ranks, bn_sync, &run.spec.config))?;
        run.writes = lead;
        // No rank starts (and rank 0 writes its first state) before every rank has checked
        // the run directory.
        ranks.barrier();
    } else {
        BnSync::parse(&a.sync.bn_sync)?;
    }
    if lead && run.dir().is_none() && a.save.is_none() {
        eprintln!(
            "warning: neither --out nor --save given: the trained model will not be saved, and \
             the run cannot be resumed if stopped"
        );
    }
    let steps = run.spec.config.steps;
    let start_step = run.step();
    let mut progress = Reporter::new(mode, run.net.name(), steps, start_step);
    if !lead {
        progress = progress.silenced();
    }
    let mut last_accuracy = None;
    let result = run.run(split, &mut |e| match e {
        Event::Step { step, .. } => progress.step(step),
        Event::Evaluated {
            step,
            train_loss,
            test_accuracy,
        } => {
            last_accuracy = Some(test_accuracy);
            progress.evaluated(step, train_loss, test_accuracy);
        }
        Event::Checkpoint { .. } => {}
    });
    let seconds = progress.elapsed();
    if let Err(e) = result {
        progress.abandon();
        if !lead {
            return Err(e);
        }
        if let Error::Stopped { step } = e {
            match run.dir() {
                Some(dir) => eprintln!(
                    "stopped at step {} of {} ({}); the run's state is in {}\nresume with: {}bnlab train --resume {}",
                    cli::progress::group(step as u64),
                    cli::progress::group(steps as u64),
                    stop_signal_name(stop),
                    dir.join(run::STATE_FILE).display(),
                    if ranks.size() > 1 {
                        format!("mpirun -n {} ", ranks.size())
                    } else {
                        String::new()
                    },
                    shell_word(&dir.display().to_string())
                ),
                None => eprintln!(
                    "stopped at step {} of {} ({}); nothing was saved (no --out), so the run cannot be resumed",
                    cli::progress::group(step as u64),
                    cli::progress::group(steps as u64),
                    stop_signal_name(stop),
                ),
            }
            return Err(e);
        }
        if let Some(dir) = run.dir() {
            if dir.join(run::STATE_FILE).exists() {
                eprintln!(
                    "the last good checkpoint is {} (weights: {})",
                    dir.join(run::STATE_FILE).display(),
                    dir.join(run::LATEST_FILE).display()
                );
            }
        }
        return Err(e);
    }
    progress.finish();
    if !lead {
        return Ok(());
    }
    let mut written = Vec::new();
    if let Some(dir) = run.dir() {
        written.push(dir.join(run::FINAL_FILE).display().to_string());
    }
    if let Some(p) = &a.save {
        checkpoint::save(&mut run.net, p)?;
        written.push(p.display().to_string());
    }
    let done = steps - start_step;
    eprintln!(
        "{}: {} steps in {} ({}); final test accuracy {}; model {}",
        run.net.name(),
        cli::progress::group(done as u64),
        fmt_duration(seconds),
        fmt_rate(done as f64 / seconds.max(1e-9)),
        last_accuracy.map_or_else(|| "—".to_string(), |a| format!("{:.2}%", 100.0 * a)),
        if written.is_empty() {
            "not saved (no --out or --save)".to_string()
        } else {
            format!("written to {}", written.join(" and "))
        }
    );
    Ok(())
}

/// Make `net` one replica of the data-parallel run on `ranks`, checking that the global batch
/// splits into slices BN can normalize.
fn join_ranks(net: &mut Network, ranks: &Ranks, bn_sync: BnSync, c: &TrainConfig) -> Result<()> {
    let p = ranks.size();
    let least = if net.has_batch_norm() { 2 * p } else { p };
    if c.batch_size < least {
        return Err(Error::config(
            "--batch-size",
            format!(
                "{} over {p} processes: needs at least {least} (every process's slice holds at \
                 least {} example(s))",
                c.batch_size,
                least / p
            ),
        ));
    }
    net.set_dist(ranks.dist(bn_sync))?;
    net.check_split(c.batch_size)
}

/// "SIGINT" / "SIGTERM": what asked the run to stop.
fn stop_signal_name(stop: &bnlab::stop::Stop) -> &'static str {
    match stop.reason() {
        2 => "SIGINT",
        15 => "SIGTERM",
        _ => "stop requested",
    }
}

fn non_negative(name: &str, v: i64) -> Result<usize> {
    if v < 0 {
        return Err(Error::config(name, format!("{v} (must be >= 0)")));
    }
    Ok(v as usize)
}

fn parse_bn_stats(s: &str) -> Result<InferenceStats> {
    match s {
        "running" => Ok(InferenceStats::Running),
        "population" => Ok(InferenceStats::Population),
        other => Err(Error::config(
            "--bn-stats",
            format!("'{other}' (expected running or population)"),
        )),
    }
}

/// A network of `model` with `weights`, using the chosen inference statistics (Algorithm 2
/// over the training set for `population`).
fn inference_net(
    model: &str,
    weights: &Path,
    bn_stats: &str,
    population_batch: Option<i64>,
    data: &DataArgs,
    threads: usize,
) -> Result<Network> {
    let spec = model::resolve(model)?;
    let stats = parse_bn_stats(bn_stats)?;
    let needs_data = stats == InferenceStats::Population && spec.has_batch_norm();
    let split = if needs_data {
        Some(load_data(data, Some(&spec))?)
    } else {
        None
    };
    // The example shape: from the data when loaded, else recorded in the checkpoint, else the
    // model file's own.
    let input = match &split {
        Some(s) => model::resolve_input(&spec, Some(&data_shape(s)))?,
        None => {
            let file = checkpoint::TensorFile::read(weights)?;
            match checkpoint::recorded_input_shape(&file) {
                Some(shape) => model::resolve_input(&spec, Some(&shape))?,
                None => model::resolve_input(&spec, None)?,
            }
        }
    };
    let mut net = Network::build(&spec, &input, 0, 500, threads)?;
    checkpoint::load(&mut net, weights)?;
    if let Some(mut split) = split {
        split.set_normalization(net.normalization.clone())?;
        let batch = population_batch_size(population_batch, &net)?;
        population_statistics(&mut net, &split.train, batch, None)?;
    }
    Ok(net)
}

/// Algorithm 2's batch size: the flag, else the training batch size the checkpoint records,
/// else 60 (the paper's MNIST batch); said on stderr so it is never a silent choice.
fn population_batch_size(flag: Option<i64>, net: &Network) -> Result<usize> {
    let (b, from) = match (flag, net.train_batch_size) {
        (Some(f), _) => (
            positive("--population-batch-size", f)?,
            "--population-batch-size",
        ),
        (None, Some(t)) => (t, "the training batch size recorded in the checkpoint"),
        (None, None) => (
            60,
            "the default; the checkpoint records no training batch size",
        ),
    };
    if b < 2 {
        return Err(Error::config(
            "--population-batch-size",
            "Algorithm 2 needs mini-batches of at least 2 examples",
        ));
    }
    eprintln!("Algorithm 2: population statistics over training mini-batches of {b} ({from})");
    Ok(b)
}

/// The kernels' thread count: `--threads N` if given, else `$BNLAB_THREADS`, else every core
/// available to the process (divided among the MPI ranks of this host when run under
/// mpirun); at most `kernels::MAX_THREADS` (said on stderr when fewer than asked). Results do
/// not depend on it.
/// Whether the steps may choose their thread count as they run (`tune::ThreadTuner`): when
/// neither `--threads` nor `$BNLAB_THREADS` fixes it.
fn threads_adaptive(asked: Option<usize>) -> bool {
    asked.is_none() && std::env::var("BNLAB_THREADS").map_or(true, |v| v.trim().is_empty())
}

fn threads_used(asked: Option<usize>) -> Result<usize> {
    let (n, explicit) = match asked {
        Some(n) => (n, "--threads"),
        None => match std::env::var("BNLAB_THREADS") {
            Ok(v) if !v.trim().is_empty() => (
                v.trim().parse::<usize>().map_err(|_| {
                    Error::config("$BNLAB_THREADS", format!("'{v}' is not a whole number"))
                })?,
                "$BNLAB_THREADS",
            ),
            _ => (default_threads(), ""),
        },
    };
    if n == 0 {
        return Err(Error::config(explicit, "must be at least 1"));
    }
    let used = n.min(bnlab::kernels::MAX_THREADS);
    if used < n && !explicit.is_empty() {
        eprintln!(
            "note: {explicit} {n}: bnlab's kernels use at most {} threads; running on {used}",
            bnlab::kernels::MAX_THREADS
        );
    }
    Ok(used)
}

/// Every core available to this process, shared among the MPI ranks on this host (Open MPI's
/// `OMPI_COMM_WORLD_LOCAL_SIZE`, or `MPI_LOCALNRANKS` of MPICH); at least 1.
fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local_ranks = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse::<usize>().ok())
        .filter(|&r| r > 0)
        .unwrap_or(1);
    (cores / local_ranks).max(1)
}

fn fold_cmd(a: FoldArgs) -> Result<()> {
    check_writable(&a.save)?;
    let mut net = inference_net(
        &a.model,
        &a.weights,
        &a.bn_stats,
        a.population_batch_size,
        &a.data,
        1,
    )?;
    let mut folded = bnlab::fold::fold(&mut net)?;
    checkpoint::save(&mut folded, &a.save)?;
    eprintln!(
        "wrote {} ({} with {} statistics folded in)",
        a.save.display(),
        folded.name(),
        a.bn_stats
    );
    Ok(())
}

fn export_cmd(a: ExportArgs) -> Result<()> {
    if a.format != "onnx" {
        return Err(Error::config(
            "--format",
            format!("'{}' (only onnx is supported)", a.format),
        ));
    }
    check_writable(&a.out)?;
    let mut net = inference_net(
        &a.model,
        &a.weights,
        &a.bn_stats,
        a.population_batch_size,
        &a.data,
        1,
    )?;
    bnlab::onnx::export_onnx(&mut net, &a.out)?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let spec = a.norm.model(&a.model)?;
    let stats = parse_bn_stats(&a.bn_stats)?;
    let batch = 500;
    let mut split = load_data(&a.data, Some(&spec))?;
    let mut net = network_for(&spec, &split, 0, batch, threads_used(a.threads)?)?;
    checkpoint::load(&mut net, &a.weights)?;
    split.set_normalization(net.normalization.clone())?;
    let mut pop_batches = 0;
    if stats == InferenceStats::Population && net.has_batch_norm() {
        let batch = population_batch_size(a.population_batch_size, &net)?;
        pop_batches = population_statistics(&mut net, &split.train, batch, None)?;
    }
    let mut evaluator = Evaluator::new(batch, split.test.features());
    let ev = evaluator.evaluate(&mut net, &split.test, None, None)?;
    println!(
        "{}: test accuracy {:.2}% ({} / {}), loss {:.4}, BN statistics: {}",
        net.name(),
        100.0 * ev.accuracy(),
        ev.correct,
        ev.total,
        ev.loss,
        a.bn_stats
    );
    if a.json {
        let j = serde_json::json!({
            "model": net.name(),
            "weights": a.weights.display().to_string(),
            "bn_stats": a.bn_stats,
            "population_batches": pop_batches,
            "accuracy": ev.accuracy(),
            "correct": ev.correct,
            "total": ev.total,
            "loss": ev.loss,
        });
        println!("{j}");
    }
    Ok(())
}

fn bench(a: BenchArgs, ranks: &Ranks) -> Result<()> {
    let conv = a.conv.algo()?;
    let spec = a.norm.model(&a.model)?;
    let steps = positive("--steps", a.steps)?;
    let config = TrainConfig {
        steps,
        batch_size: positive("--batch-size", a.batch_size)?,
        lr: 0.1,
        momentum: 0.0,
        weight_decay: 0.0,
        schedule: Schedule::Constant,
        seed: 1,
        order: Order::Shuffle,
        eval_every: 0,
        threads: threads_used(a.threads)?,
        augment: bnlab::train::Augment::None,
        bn: Default::default(),
    };
    config.validate(spec.has_batch_norm())?;
    let simd = bnlab::kernels::simd::level();
    let split = load_data(&a.data, Some(&spec))?;
    config.validate_for_data(split.train.len())?;
    let mut net = network_for(&spec, &split, 1, config.batch_size, config.threads)?;
    net.set_conv_algo(conv);
    let bn_sync = BnSync::parse(&a.sync.bn_sync)?;
    if ranks.size() > 1 {
        ranks.agree(join_ranks(&mut net, ranks, bn_sync, &config))?;
    }
    let mut trainer = Trainer::new(config.clone(), split.train.len(), split.train.features());
    if threads_adaptive(a.threads) {
        trainer.tune_threads(config.threads);
    }
    let warmup = (steps / 10).clamp(1, 200);
    /// Keeps the last loss; nothing is evaluated.
    struct LastLoss(f64);
    impl Observer for LastLoss {
        fn evaluate(&mut self, _: &mut Network, _: usize, _: f64) -> Result<()> {
            Ok(())
        }
        fn after_step(
            &mut self,
            _: &mut Network,
            _: &Trainer,
            loss: f64,
            _: &LossSince,
            _: bool,
        ) -> Result<()> {
            self.0 = loss;
            Ok(())
        }
    }
    let mut last = LastLoss(0.0);
    let mut since = LossSince::default();
    let data = &split.train;
    train_loop(
        &mut net,
        &mut trainer,
        data,
        warmup,
        0,
        &mut since,
        &mut last,
    )?;
    ranks.barrier();
    if let Some(t) = trainer.tuner_mut() {
        t.reset_counts();
    }
    let t = Instant::now();
    train_loop(
        &mut net,
        &mut trainer,
        data,
        warmup + steps,
        0,
        &mut since,
        &mut last,
    )?;
    ranks.barrier();
    let secs = t.elapsed().as_secs_f64();
    if !ranks.lead() {
        return Ok(());
    }
    let loss = last.0;
    let rate = steps as f64 / secs;
    let procs = if ranks.size() > 1 {
        format!("{} processes x ", ranks.size())
    } else {
        String::new()
    };
    // With the thread count left to bnlab: the steps on fewer threads than the most, if any.
    let by_threads = trainer.tuner().map(|t| t.steps_by_threads());
    let fewer: u64 = by_threads
        .iter()
        .flatten()
        .filter(|&&(n, _)| n < config.threads)
        .map(|&(_, s)| s)
        .sum();
    let adaptive = match &by_threads {
        Some(_) if fewer > 0 => format!(", adaptive: {fewer} steps on fewer"),
        Some(_) => ", adaptive".to_string(),
        None => String::new(),
    };
    println!(
        "{}: {steps} steps of batch {} in {secs:.3} s: {rate:.0} steps/s ({procs}{} threads{adaptive}, last loss {loss:.4})",
        net.name(),
        config.batch_size,
        config.threads
    );
    if a.json {
        // The products' arithmetic: 2 FLOP per multiply-add, forward and the two backward
        // products (input and weight gradients); BN, activations and pools are not counted.
        // Those of the direct products also under --conv winograd (which does fewer
        // multiplications): `gflops` is then an effective rate, comparable across algorithms.
        let macs: u64 = model::build(&net.spec, &net.input_shape, 0, false)?
            .summary
            .iter()
            .filter(|r| r.depth == 0)
            .map(|r| r.macs)
            .sum();
        let flop_per_step = 6.0 * macs as f64 * config.batch_size as f64;
        let j = serde_json::json!({
            "model": net.name(),
            "batch_size": config.batch_size,
            "steps": steps,
            "processes": ranks.size(),
            "bn_sync": (ranks.size() > 1).then(|| bn_sync.name()),
            "threads": config.threads,
            "threads_adaptive": by_threads.is_some(),
            "steps_by_threads": by_threads
                .iter()
                .flatten()
                .map(|&(n, s)| serde_json::json!({"threads": n, "steps": s}))
                .collect::<Vec<_>>(),
            "simd": simd.name(),
            "conv": conv.name(),
            "seconds": secs,
            "steps_per_s": rate,
            "flop_per_step": flop_per_step,
            "gflops": flop_per_step * rate / 1e9,
        });
        println!("{j}");
    }
    Ok(())
}

/// The study in `--resume DIR`, or a new one in `--out` (refusing a folder that holds one).
fn open_or_create_study(
    name: &str,
    dirs: &StudyDirArgs,
    out: &Path,
    setup: impl FnOnce() -> Result<serde_json::Value>,
    data: Option<&Path>,
    stop: &bnlab::stop::Stop,
) -> Result<Study> {
    let study = match &dirs.resume {
        Some(dir) => {
            let study = Study::open(dir, name)?;
            check_study_ranks(name, &study, 1)?;
            eprintln!(
                "resuming the {name} study in {} ({} of its runs finished)",
                dir.display(),
                finished_runs(&study)
            );
            study
        }
        None => Study::create(out, name, setup()?, data.map(absolute))?,
    };
    Ok(study.with_stop(stop.clone()))
}

/// A study resumes only on as many processes as it started with (a data-parallel study's
/// runs continue bit-identically only with the same reductions).
fn check_study_ranks(name: &str, study: &Study, p: usize) -> Result<()> {
    let started_on = study.manifest().ranks.unwrap_or(1);
    if started_on != p {
        return Err(Error::config(
            "--resume",
            format!(
                "the {name} study in {} was run on {started_on} process(es), this is {p}: \
                 resume it with {}bnlab reproduce {name} --resume {}",
                study.dir().display(),
                if started_on > 1 {
                    format!("mpirun -n {started_on} ")
                } else {
                    String::new()
                },
                shell_word(&study.dir().display().to_string())
            ),
        ));
    }
    Ok(())
}

/// [`open_or_create_study`] on `ranks`; with more than one, a data-parallel study: every rank
/// checks the directory (and `check`s the settings: can every run train data-parallel?)
/// before rank 0 writes `study.json` (recording P and the BN sync), the others open it after,
/// and a failure on any rank is agreed (`Ranks::agree`). `bn_sync`: the flag, if given.
#[allow(clippy::too_many_arguments)]
fn open_or_create_study_on(
    name: &str,
    dirs: &StudyDirArgs,
    out: &Path,
    setup: impl FnOnce() -> Result<serde_json::Value>,
    data: Option<&Path>,
    stop: &bnlab::stop::Stop,
    ranks: &Ranks,
    bn_sync: Option<&str>,
    check: &dyn Fn(&serde_json::Value, &bnlab::dist::Dist) -> Result<()>,
) -> Result<Study> {
    let flag = bn_sync.map(BnSync::parse).transpose();
    if ranks.size() == 1 {
        flag?;
        return open_or_create_study(name, dirs, out, setup, data, stop);
    }
    let p = ranks.size();
    // What every rank checks before anything is written.
    let checked = (|| -> Result<(Option<serde_json::Value>, BnSync)> {
        let flag = flag?;
        match &dirs.resume {
            Some(dir) => {
                let study = Study::open(dir, name)?;
                check_study_ranks(name, &study, p)?;
                let sync = study.manifest().bn_sync.unwrap_or(BnSync::Global);
                if let Some(f) = flag.filter(|&f| f != sync) {
                    return Err(Error::config(
                        "--bn-sync",
                        format!(
                            "{} (the study in {} runs with --bn-sync {}; leave the flag out to \
                             resume it)",
                            f.name(),
                            dir.display(),
                            sync.name()
                        ),
                    ));
                }
                let dist = ranks.dist(sync).expect("more than one rank");
                check(&study.manifest().setup, &dist)?;
                Ok((None, sync))
            }
            None => {
                let sync = flag.unwrap_or(BnSync::Global);
                let setup = setup()?;
                let dist = ranks.dist(sync).expect("more than one rank");
                check(&setup, &dist)?;
                Study::check_new(out, name)?;
                Ok((Some(setup), sync))
            }
        }
    })();
    let (setup, sync) = ranks.agree(checked)?;
    let dir = match setup {
        Some(setup) => {
            // Rank 0 writes the study; the others open it once it is there.
            let made = if ranks.lead() {
                Study::create_with(out, name, setup, data.map(absolute), Some((p, sync)))
                    .map(|_| ())
            } else {
                Ok(())
            };
            ranks.agree(made)?;
            out.to_path_buf()
        }
        None => dirs.resume.clone().expect("resuming"),
    };
    let study = ranks.agree(Study::open(&dir, name))?;
    if ranks.lead() && dirs.resume.is_some() {
        eprintln!(
            "resuming the {name} study in {} on {p} processes ({} of its runs finished)",
            dir.display(),
            finished_runs(&study)
        );
    }
    Ok(study.with_stop(stop.clone()).with_dist(ranks.dist(sync)))
}

/// A new study whose data cannot be loaded is removed again, so that the same command with
/// the data fixed starts it (rather than asking for --resume).
fn discard_if_fresh<T>(dirs: &StudyDirArgs, study: &Study, r: Result<T>) -> Result<T> {
    if r.is_err() && dirs.resume.is_none() && study.writes() {
        let _ = std::fs::remove_file(study.dir().join(bnlab::study::STUDY_FILE));
        let _ = std::fs::remove_dir(study.dir().join(bnlab::study::RUNS_DIR));
    }
    r
}

/// Runs of a study with a result.
fn finished_runs(study: &Study) -> usize {
    std::fs::read_dir(study.dir().join(bnlab::study::RUNS_DIR))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join(bnlab::study::RESULT_FILE).is_file())
                .count()
        })
        .unwrap_or(0)
}

/// Say where a stopped study stands and the command that continues it (`launcher`: `mpirun
/// -n P ` for a data-parallel study, else empty).
fn report_stopped(
    name: &str,
    study: &Study,
    meter: &StudyMeter,
    stop: &bnlab::stop::Stop,
    launcher: &str,
) {
    let (done, total) = meter.runs();
    let dir = shell_word(&study.dir().display().to_string());
    eprintln!(
        "stopped ({}): {done} of {total} runs finished; the study's progress (results, and \
         checkpoints of the runs in progress) is in {}\nresume with: {launcher}bnlab reproduce {name} --resume {dir}\n\
         report so far: bnlab reproduce {name} --report-only {dir}",
        stop_signal_name(stop),
        study.dir().join(bnlab::study::RUNS_DIR).display(),
    );
}

/// The data a resumed study uses: the flags, else what it started with.
fn study_data(study: &Study, flag: Option<&Path>) -> Option<PathBuf> {
    flag.map(Path::to_path_buf)
        .or_else(|| study.manifest().data.clone())
}

fn reproduce_mnist(a: ReproduceArgs, stop: &bnlab::stop::Stop, ranks: &Ranks) -> Result<()> {
    let mode = ranks.agree(a.control.mode())?;
    if let Some(dir) = &a.study.report_only {
        if !ranks.lead() {
            // Rank 0 alone writes the report of a study kept on disk.
            return Ok(());
        }
        let study = Study::open(dir, "mnist")?;
        let setup: MnistSetup = study.setup()?;
        let (report, missing) = mnist::partial_report(&setup, &study)?;
        if report.variants.is_empty() {
            return Err(Error::config(
                "--report-only",
                format!(
                    "no run of the study in {} has finished yet: nothing to report",
                    dir.display()
                ),
            ));
        }
        report::write_mnist_report(dir, &report)?;
        report::mark_partial(dir, &missing)?;
        eprintln!(
            "wrote the report of {} ({} of {} runs; missing: {})",
            dir.display(),
            report.variants.len(),
            mnist::VARIANTS.len(),
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(", ")
            }
        );
        return Ok(());
    }
    let make_setup = || -> Result<MnistSetup> {
        Ok(MnistSetup {
            steps: positive("--steps", a.steps)?,
            eval_every: positive("--eval-every", a.eval_every)?,
            lr: if a.lr.is_finite() && a.lr > 0.0 {
                a.lr
            } else {
                return Err(Error::config(
                    "--lr",
                    format!("{} (must be positive)", a.lr),
                ));
            },
            seed: a.seed,
            norm: study_norm(a.norm.as_deref())?,
            ..MnistSetup::default()
        })
    };
    if a.study.resume.is_none() {
        ranks.agree(make_setup())?;
    }
    let study = open_or_create_study_on(
        "mnist",
        &a.study,
        &a.out,
        || serde_json::to_value(make_setup()?).map_err(|e| Error::config("setup", e.to_string())),
        a.data.data.as_deref(),
        stop,
        ranks,
        a.bn_sync.as_deref(),
        &|setup, dist| {
            let setup: MnistSetup = serde_json::from_value(setup.clone())
                .map_err(|e| Error::config("setup", e.to_string()))?;
            mnist::check_data_parallel(&setup, dist)
        },
    )?;
    let setup: MnistSetup = ranks.agree(study.setup())?;
    let data = DataArgs {
        data: study_data(&study, a.data.data.as_deref()),
        ..a.data.clone()
    };
    let split = discard_if_fresh(&a.study, &study, ranks.agree(load_data(&data, None)))?;
    let out = study.dir().to_path_buf();
    let lead = ranks.lead();
    let meter = StudyMeter::new(mode, "reproduce mnist", 2, setup.steps, 2);
    let on_progress = |p: Progress<'_>| {
        if !lead {
            // Progress on rank 0 alone (every rank computes the same).
            return;
        }
        meter.update(RunUpdate {
            slot: mnist::VARIANTS
                .iter()
                .position(|v| *v == p.variant)
                .unwrap_or(0),
            label: p.variant,
            step: p.step,
            steps: p.steps,
            loss: Some(p.loss),
            accuracy: p.last_accuracy,
            evaluated: p.evaluated,
            finished: p.finished,
        })
    };
    let t = Instant::now();
    let result = mnist::reproduce(&setup, &split, &study, &on_progress);
    if lead {
        meter.finish();
    }
    let result = match result {
        Err(e @ Error::Stopped { .. }) => {
            if lead {
                report_stopped("mnist", &study, &meter, stop, &ranks.launcher());
            }
            return Err(e);
        }
        r => r?,
    };
    if !lead {
        return Ok(());
    }
    let wall = t.elapsed().as_secs_f64();
    report::write_mnist_report(&out, &result)?;
    for v in &result.variants {
        eprintln!(
            "{}: final test accuracy {:.2}% (running statistics), {:.2}% (population statistics), trained in {}",
            v.name,
            100.0 * v.final_running,
            100.0 * v.final_population,
            fmt_duration(v.train_seconds)
        );
    }
    eprintln!(
        "reproduce mnist: {}; wrote {}",
        fmt_duration(wall),
        display_dir(&out)
    );
    Ok(())
}

fn reproduce_normalizers(
    a: NormalizersArgs,
    stop: &bnlab::stop::Stop,
    ranks: &Ranks,
) -> Result<()> {
    use bnlab::experiments::normalizers::{self as norms, NormalizersSetup};
    let make_setup = || -> Result<NormalizersSetup> {
        let mut setup = if a.quick {
            NormalizersSetup::quick()
        } else {
            NormalizersSetup::default()
        };
        if let Some(n) = a.examples {
            setup.examples = positive("--examples", n)?;
        }
        setup.seed = a.seed;
        setup.validate()?;
        Ok(setup)
    };
    let write = |dir: &Path, setup: &NormalizersSetup, results: &[Option<norms::RunResult>]| {
        report::write_normalizers_report(
            dir,
            &report::NormalizersReport {
                setup,
                jobs: &setup.jobs(),
                results,
            },
        )
    };
    if let Some(dir) = &a.study.report_only {
        if !ranks.lead() {
            // Rank 0 alone writes the report of a study kept on disk.
            return Ok(());
        }
        let study = Study::open(dir, "normalizers")?;
        let setup: NormalizersSetup = study.setup()?;
        let results = norms::finished_results(&setup, &study)?;
        let missing = results.iter().filter(|r| r.is_none()).count();
        write(dir, &setup, &results)?;
        eprintln!(
            "wrote the report of {} finished runs ({missing} missing) to {}",
            results.len() - missing,
            dir.display()
        );
        return Ok(());
    }
    if a.study.resume.is_none() {
        ranks.agree(make_setup())?;
    }
    let study = open_or_create_study_on(
        "normalizers",
        &a.study,
        &a.out,
        || serde_json::to_value(make_setup()?).map_err(|e| Error::config("setup", e.to_string())),
        a.data.as_deref(),
        stop,
        ranks,
        None,
        // Runs whose batch cannot be split are skipped and reported as such (see
        // `normalizers::data_parallel_skip`), not refused.
        &|setup, _| {
            serde_json::from_value::<NormalizersSetup>(setup.clone())
                .map_err(|e| Error::config("setup", e.to_string()))?
                .validate()
        },
    )?;
    let setup: NormalizersSetup = ranks.agree(study.setup())?;
    let split = discard_if_fresh(
        &a.study,
        &study,
        ranks.agree(data::fashion_mnist(
            study_data(&study, a.data.as_deref()).as_deref(),
        )),
    )?;
    let out = study.dir().to_path_buf();
    let lead = ranks.lead();
    let t0 = std::time::Instant::now();
    let done_before = std::sync::atomic::AtomicUsize::new(0);
    let on_done = |d: norms::Done<'_>| {
        if !lead {
            // Progress on rank 0 alone (every rank computes the same).
            return;
        }
        if d.resumed {
            done_before.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let fresh = d.finished - done_before.load(std::sync::atomic::Ordering::Relaxed);
        let elapsed = t0.elapsed().as_secs_f64();
        let eta = if fresh > 0 && !d.resumed {
            format!(
                ", study ETA {}",
                fmt_duration(elapsed / fresh as f64 * (d.total - d.finished) as f64)
            )
        } else {
            String::new()
        };
        let what = match (&d.result.skipped, d.result.test_accuracy) {
            (Some(why), _) => why.clone(),
            (None, Some(acc)) => format!("test accuracy {:.2}%", 100.0 * acc),
            (None, None) => format!(
                "diverged at step {}",
                d.result.diverged_at.unwrap_or_default()
            ),
        };
        eprintln!(
            "[{}/{}] {}: {what}{}{eta}",
            d.finished,
            d.total,
            d.job.key(),
            if d.resumed {
                " (finished earlier)".to_string()
            } else {
                format!(" ({})", fmt_duration(d.result.seconds))
            }
        );
    };
    let results = match norms::run_study(&setup, &split, &study, &on_done) {
        Err(Error::Stopped { step }) => {
            if lead {
                eprintln!(
                    "stopped; the study is kept in {}. Resume it with:\n  {}bnlab reproduce normalizers --resume {}",
                    out.display(),
                    ranks.launcher(),
                    cli::shell_word(&out.display().to_string())
                );
            }
            return Err(Error::Stopped { step });
        }
        other => other?,
    };
    if !lead {
        return Ok(());
    }
    let results: Vec<Option<_>> = results.into_iter().map(Some).collect();
    write(&out, &setup, &results)?;
    eprintln!(
        "reproduce normalizers: {}; wrote {}",
        fmt_duration(t0.elapsed().as_secs_f64()),
        out.display()
    );
    Ok(())
}

fn reproduce_ics(a: IcsStudyArgs, stop: &bnlab::stop::Stop, ranks: &Ranks) -> Result<()> {
    use bnlab::experiments::ics::{self, IcsSetup};
    let make_setup = || -> Result<IcsSetup> {
        let mut setup = if a.quick {
            IcsSetup::quick()
        } else {
            IcsSetup::default()
        };
        setup.seed = a.seed;
        setup.validate()?;
        Ok(setup)
    };
    let write = |dir: &Path, setup: &IcsSetup, results: &[Option<ics::RunResult>]| {
        report::write_ics_report(
            dir,
            &report::IcsReport {
                setup,
                jobs: &setup.jobs(),
                results,
            },
        )
    };
    if let Some(dir) = &a.study.report_only {
        if !ranks.lead() {
            // Rank 0 alone writes the report of a study kept on disk.
            return Ok(());
        }
        let study = Study::open(dir, "ics")?;
        let setup: IcsSetup = study.setup()?;
        let results = ics::finished_results(&setup, &study)?;
        let missing = results.iter().filter(|r| r.is_none()).count();
        write(dir, &setup, &results)?;
        eprintln!(
            "wrote the report of {} finished runs ({missing} missing) to {}",
            results.len() - missing,
            dir.display()
        );
        return Ok(());
    }
    if a.study.resume.is_none() {
        ranks.agree(make_setup())?;
    }
    let study = open_or_create_study_on(
        "ics",
        &a.study,
        &a.out,
        || serde_json::to_value(make_setup()?).map_err(|e| Error::config("setup", e.to_string())),
        a.data.as_deref(),
        stop,
        ranks,
        None,
        &|setup, dist| {
            let setup: IcsSetup = serde_json::from_value(setup.clone())
                .map_err(|e| Error::config("setup", e.to_string()))?;
            ics::check_data_parallel(&setup, dist)
        },
    )?;
    let setup: IcsSetup = ranks.agree(study.setup())?;
    let lead = ranks.lead();
    let loaded = {
        let needs = |d: &str| setup.nets.iter().any(|n| n.dataset == d);
        let fashion = if needs("fashion-mnist") {
            Some(data::fashion_mnist(
                study_data(&study, a.data.as_deref()).as_deref(),
            ))
            .transpose()
        } else {
            Ok(None)
        };
        fashion.and_then(|f| {
            let m = if needs("mnist") {
                Some(data::mnist(a.mnist.as_deref(), true)).transpose()?
            } else {
                None
            };
            Ok((f, m))
        })
    };
    let (fashion, mnist) = discard_if_fresh(&a.study, &study, ranks.agree(loaded))?;
    let splits: Vec<&data::Split> = setup
        .nets
        .iter()
        .map(|n| match n.dataset.as_str() {
            "mnist" => mnist.as_ref(),
            _ => fashion.as_ref(),
        })
        .map(|s| s.ok_or_else(|| Error::config("reproduce ics", "a data set was not loaded")))
        .collect::<Result<_>>()?;
    let out = study.dir().to_path_buf();
    let t0 = std::time::Instant::now();
    let on_done = |d: ics::Done<'_>| {
        if !lead {
            // Progress on rank 0 alone (every rank computes the same).
            return;
        }
        let what = match (d.result.final_test_accuracy, d.result.diverged_at) {
            (Some(acc), _) => format!("test accuracy {:.2}%", 100.0 * acc),
            (None, Some(step)) => format!("diverged at step {step}"),
            (None, None) => "no evaluation".into(),
        };
        eprintln!(
            "[{}/{}] {}: {what}{}",
            d.finished,
            d.total,
            d.job.key,
            if d.resumed {
                " (finished earlier)".to_string()
            } else {
                format!(" ({})", fmt_duration(d.result.seconds))
            }
        );
    };
    if lead {
        eprintln!(
            "reproduce ics: {} runs ({}) {}; a line per finished run",
            setup.jobs().len(),
            setup
                .nets
                .iter()
                .map(|n| format!("{} x {} steps", n.model, n.steps))
                .collect::<Vec<_>>()
                .join(", "),
            if ranks.size() > 1 {
                format!(
                    "one at a time, each data-parallel on {} processes",
                    ranks.size()
                )
            } else {
                format!("on {} threads", setup.workers)
            }
        );
    }
    let results = match ics::run_study(&setup, &splits, &study, &on_done) {
        Err(Error::Stopped { step }) => {
            if lead {
                eprintln!(
                    "stopped; the study is kept in {}. Resume it with:\n  {}bnlab reproduce ics --resume {}\n\
                     report so far: bnlab reproduce ics --report-only {}",
                    out.display(),
                    ranks.launcher(),
                    cli::shell_word(&out.display().to_string()),
                    cli::shell_word(&out.display().to_string())
                );
            }
            return Err(Error::Stopped { step });
        }
        other => other?,
    };
    if !lead {
        return Ok(());
    }
    let results: Vec<Option<_>> = results.into_iter().map(Some).collect();
    write(&out, &setup, &results)?;
    let claims = report::ics_claims(&report::IcsReport {
        setup: &setup,
        jobs: &setup.jobs(),
        results: &results,
    });
    let held = claims.iter().filter(|c| c.holds == Some(true)).count();
    eprintln!(
        "reproduce ics: {}; {held} of {} claims hold at this scale; wrote {}",
        fmt_duration(t0.elapsed().as_secs_f64()),
        claims.len(),
        out.display()
    );
    Ok(())
}

/// A study's `--norm`, checked; `bn` (or none given) is the paper's batch normalization.
fn study_norm(norm: Option<&str>) -> Result<Option<String>> {
    match norm {
        None => Ok(None),
        Some(n) => match model::NormChoice::parse(n)? {
            model::NormChoice::Bn => Ok(None),
            _ => Ok(Some(n.to_string())),
        },
    }
}

/// The inception study's settings from the flags.
fn inception_setup(a: &InceptionArgs) -> Result<InceptionSetup> {
    let mut setup = if a.quick {
        InceptionSetup::quick()
    } else {
        InceptionSetup::default()
    };
    setup.norm = study_norm(a.norm.as_deref())?;
    if let Some(n) = a.steps {
        setup.steps = positive("--steps", n)?;
    }
    if let Some(k) = a.eval_every {
        setup.eval_every = positive("--eval-every", k)?;
    }
    if let Some(m) = a.members {
        setup.ensemble_members = positive("--members", m)?;
    }
    if let Some(list) = &a.sweep {
        let bad = || {
            Error::config(
                "--sweep",
                format!("'{list}' (expected positive learning rates separated by commas)"),
            )
        };
        let mut rates = list
            .split(',')
            .map(|r| r.trim().parse::<f64>().map_err(|_| bad()))
            .collect::<Result<Vec<f64>>>()?;
        if rates.iter().any(|r| !r.is_finite() || *r <= 0.0) {
            return Err(bad());
        }
        rates.sort_by(f64::total_cmp);
        rates.dedup();
        setup.sweep_rates = rates;
    }
    setup.seed = a.seed;
    setup.validate()?;
    Ok(setup)
}

fn reproduce_inception(a: InceptionArgs, stop: &bnlab::stop::Stop, ranks: &Ranks) -> Result<()> {
    let mode = ranks.agree(a.control.mode())?;
    if let Some(dir) = &a.study.report_only {
        if !ranks.lead() {
            // Rank 0 alone writes the report of a study kept on disk.
            return Ok(());
        }
        let study = Study::open(dir, "inception")?;
        let setup: InceptionSetup = study.setup()?;
        let split = data::fashion_mnist(study_data(&study, a.data.as_deref()).as_deref())?;
        let (report, missing) = inception::partial_report(&setup, &split, &study)?;
        report::write_inception_report(dir, &report)?;
        report::mark_partial(dir, &missing)?;
        eprintln!(
            "wrote the report of {} ({} of {} runs finished; missing: {})",
            dir.display(),
            setup.job_count() - missing.len(),
            setup.job_count(),
            if missing.is_empty() {
                "none".to_string()
            } else {
                missing.join(", ")
            }
        );
        return Ok(());
    }
    if a.study.resume.is_none() {
        ranks.agree(inception_setup(&a))?;
    }
    let study = open_or_create_study_on(
        "inception",
        &a.study,
        &a.out,
        || {
            serde_json::to_value(inception_setup(&a)?)
                .map_err(|e| Error::config("setup", e.to_string()))
        },
        a.data.as_deref(),
        stop,
        ranks,
        None,
        &|setup, dist| {
            let setup: InceptionSetup = serde_json::from_value(setup.clone())
                .map_err(|e| Error::config("setup", e.to_string()))?;
            inception::check_data_parallel(&setup, dist)
        },
    )?;
    let setup: InceptionSetup = ranks.agree(study.setup())?;
    let split = discard_if_fresh(
        &a.study,
        &study,
        ranks.agree(data::fashion_mnist(
            study_data(&study, a.data.as_deref()).as_deref(),
        )),
    )?;
    let out = study.dir().to_path_buf();
    let lead = ranks.lead();
    let runs = setup.job_count();
    let meter = StudyMeter::new(
        mode,
        "reproduce inception",
        runs,
        setup.steps,
        setup.workers,
    );
    let on_progress = |p: inception::Progress<'_>| {
        if !lead {
            // Progress on rank 0 alone (every rank computes the same).
            return;
        }
        meter.update(RunUpdate {
            slot: p.worker,
            label: p.label,
            step: p.step,
            steps: p.steps,
            loss: None,
            accuracy: p.last_accuracy,
            evaluated: p.evaluated,
            finished: p.finished,
        })
    };
    let t = Instant::now();
    let result = inception::reproduce(&setup, &split, &study, &on_progress);
    if lead {
        meter.finish();
    }
    let result = match result {
        Err(e @ Error::Stopped { .. }) => {
            if lead {
                report_stopped("inception", &study, &meter, stop, &ranks.launcher());
            }
            return Err(e);
        }
        r => r?,
    };
    if !lead {
        return Ok(());
    }
    report::write_inception_report(&out, &result)?;
    eprintln!("lr0 = {} (best of the no-BN sweep)", result.lr0);
    for v in &result.variants {
        eprintln!(
            "{:>18}: max {:.2}% (subset), steps to Inception's max {}, final {}{}",
            v.name,
            100.0 * v.max_accuracy,
            v.steps_to_baseline_max
                .map_or_else(|| "never".to_string(), |n| n.to_string()),
            v.final_test_accuracy
                .map_or_else(|| "—".to_string(), |a| format!("{:.2}%", 100.0 * a)),
            if v.diverged { " (diverged)" } else { "" }
        );
    }
    if let Some(acc) = result.ensemble.accuracy {
        eprintln!(
            "ensemble of {}: {:.2}% (best member {})",
            result.ensemble.members,
            100.0 * acc,
            result
                .ensemble
                .best_member_accuracy
                .map_or_else(|| "—".to_string(), |a| format!("{:.2}%", 100.0 * a))
        );
    }
    eprintln!(
        "reproduce inception: {}; wrote {}",
        fmt_duration(t.elapsed().as_secs_f64()),
        display_dir(&out)
    );
    Ok(())
}

fn display_dir(p: &Path) -> String {
    p.display().to_string()
}

fn models_cmd(a: ModelsArgs) -> Result<()> {
    if let Some(ModelsAction::Show { name }) = a.action {
        let text = model::preset_text(&name).ok_or_else(|| {
            Error::config(
                "models show",
                format!(
                    "'{name}' is not a preset (known: {})",
                    model::preset_names().join(", ")
                ),
            )
        })?;
        print!("{text}");
        return Ok(());
    }
    println!(
        "{:<28} {:>10}  {:<14} description",
        "name", "parameters", "input"
    );
    for name in model::preset_names() {
        let spec = model::preset(name)?;
        let open = spec.input.iter().any(Option::is_none);
        let shape = if open {
            vec![1, 28, 28]
        } else {
            model::resolve_input(&spec, None)?
        };
        let built = model::build(&spec, &shape, 0, false)?;
        let params: usize = built
            .summary
            .iter()
            .filter(|r| r.depth == 0)
            .map(|r| r.params)
            .sum();
        let input = if open {
            "from the data".to_string()
        } else {
            format!("{shape:?}")
        };
        println!(
            "{name:<28} {:>10}  {input:<14} {}",
            group_thousands(params),
            spec.description
        );
    }
    println!("\n`bnlab models show NAME` prints a preset's model file; docs/models.md describes the format.");
    Ok(())
}

fn group_thousands(n: impl std::fmt::Display) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn summary_cmd(a: SummaryArgs) -> Result<()> {
    let spec = model::resolve(&a.model)?;
    let input = match &a.data {
        Some(_) => {
            let data = DataArgs {
                data: a.data.clone(),
                dataset: None,
                no_download: a.no_download,
            };
            let split = load_data(&data, Some(&spec))?;
            model::resolve_input(&spec, Some(&data_shape(&split)))?
        }
        None if spec.input.iter().any(Option::is_none) => {
            model::resolve_input(&spec, Some(&[1, 28, 28]))?
        }
        None => model::resolve_input(&spec, None)?,
    };
    let built = model::build(&spec, &input, 0, false)?;
    println!("{} (input {:?})", spec.name, input);
    println!(
        "{:<44} {:<14} {:<16} {:>12} {:>16}",
        "layer", "kind", "output", "parameters", "mult-adds"
    );
    for r in &built.summary {
        let path = if r.path.is_empty() { "-" } else { &r.path };
        let label = format!("{}{}", "  ".repeat(r.depth), path);
        println!(
            "{label:<44} {:<14} {:<16} {:>12} {:>16}",
            r.kind,
            format!("{:?}", r.output),
            group_thousands(r.params),
            group_thousands(r.macs)
        );
    }
    let (params, macs) = built
        .summary
        .iter()
        .filter(|r| r.depth == 0)
        .fold((0usize, 0u64), |(p, m), r| (p + r.params, m + r.macs));
    println!("total parameters: {}", group_thousands(params));
    println!(
        "multiply-adds per example: {} (convolutions and linear layers)",
        group_thousands(macs)
    );
    println!("output: {:?}", built.output_shape);
    Ok(())
}

fn grad_cmd(a: GradArgs) -> Result<()> {
    let spec = a.norm.model(&a.model)?;
    let batch = positive("--batch-size", a.batch_size)?;
    if a.offset < 0 {
        return Err(Error::config(
            "--offset",
            format!("{} (must be >= 0)", a.offset),
        ));
    }
    check_writable(&a.save)?;
    let mut split = load_data(&a.data, Some(&spec))?;
    let mut net = network_for(&spec, &split, 0, batch, threads_used(a.threads)?)?;
    checkpoint::load(&mut net, &a.weights)?;
    split.set_normalization(net.normalization.clone())?;
    let (loss, grads) = bnlab::train::gradients(&mut net, &split.train, a.offset as usize, batch)?;
    let mut entries: Vec<checkpoint::Entry> = grads
        .iter()
        .map(|g| {
            (
                g.name.clone(),
                safetensors::Dtype::F32,
                g.shape.clone(),
                checkpoint::f32_bytes(&g.values),
            )
        })
        .collect();
    entries.push((
        "loss".to_string(),
        safetensors::Dtype::F64,
        vec![1],
        loss.to_le_bytes().to_vec(),
    ));
    let mut meta = checkpoint::model_metadata(&net);
    meta.insert("bnlab_grad_offset".into(), a.offset.to_string());
    meta.insert("bnlab_grad_batch_size".into(), batch.to_string());
    checkpoint::write_entries(&a.save, &entries, meta)?;
    println!(
        "{}: loss {loss:.6} on training examples {}..{}; {} gradients written to {}",
        net.name(),
        a.offset,
        a.offset as usize + batch,
        grads.len(),
        a.save.display()
    );
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "loss": loss, "tensors": grads.len() })
        );
    }
    Ok(())
}

/// The network of `--model` with `--weights`, the data, and the batch's offset and size.
fn probe_setup(a: &ProbeArgs) -> Result<(Network, Split, usize, usize)> {
    let spec = a.norm.model(&a.model)?;
    let batch = positive("--batch-size", a.batch_size)?;
    if a.offset < 0 {
        return Err(Error::config(
            "--offset",
            format!("{} (must be >= 0)", a.offset),
        ));
    }
    let mut split = load_data(&a.data, Some(&spec))?;
    let mut net = network_for(&spec, &split, 0, batch, threads_used(a.threads)?)?;
    checkpoint::load(&mut net, &a.weights)?;
    split.set_normalization(net.normalization.clone())?;
    Ok((net, split, a.offset as usize, batch))
}

fn ics_cmd(a: IcsArgs) -> Result<()> {
    bnlab::probe::check_lr(a.lr)?;
    let (mut net, split, offset, batch) = probe_setup(&a.probe)?;
    let layers = bnlab::probe::ics(&mut net, &split.train, offset, batch, a.lr)?;
    println!(
        "{}: internal covariate shift on training examples {offset}..{} (--lr {})",
        net.name(),
        offset + batch,
        a.lr
    );
    println!(
        "{:<28} {:>12} {:>12} {:>10}",
        "layer", "grad_norm", "l2_diff", "cosine"
    );
    for l in &layers {
        let cosine = l.cosine.map_or("-".to_string(), |c| format!("{c:.6}"));
        println!(
            "{:<28} {:>12.5e} {:>12.5e} {cosine:>10}",
            l.name, l.grad_norm, l.l2_diff
        );
    }
    if a.probe.json {
        // The fields in the struct's order (json! would sort them).
        let layers = serde_json::to_string(&layers).expect("numbers and strings serialize");
        println!("{{\"layers\":{layers}}}");
    }
    Ok(())
}

fn landscape_cmd(a: LandscapeArgs) -> Result<()> {
    let etas = bnlab::probe::parse_etas(&a.etas)?;
    let (mut net, split, offset, batch) = probe_setup(&a.probe)?;
    let l = bnlab::probe::landscape(&mut net, &split.train, offset, batch, &etas)?;
    println!(
        "{}: loss {:.6} and gradient norm {:.6e} on training examples {offset}..{}",
        net.name(),
        l.loss0,
        l.grad_norm,
        offset + batch
    );
    println!("{:>12} {:>14} {:>14}", "eta", "loss", "grad_change");
    // Plain numbers where they are readable, else exponents (a step of 1e30 is allowed).
    let num = |v: f64, digits: usize| match v.abs() {
        a if a == 0.0 || (1e-3..1e6).contains(&a) || !a.is_finite() => format!("{v:.digits$}"),
        _ => format!("{v:.digits$e}"),
    };
    for p in &l.points {
        let eta = if (1e-3..1e6).contains(&p.eta.abs()) || p.eta == 0.0 {
            p.eta.to_string()
        } else {
            format!("{:e}", p.eta)
        };
        println!("{eta:>12} {:>14} {:>14.6e}", num(p.loss, 6), p.grad_change);
    }
    match l.beta_smoothness {
        Some(b) => println!("effective beta-smoothness {b:.6e}"),
        None => println!("effective beta-smoothness undefined (no nonzero step)"),
    }
    if a.probe.json {
        println!(
            "{}",
            serde_json::to_string(&l).expect("numbers and strings serialize")
        );
    }
    Ok(())
}

/// Refuse an output path whose directory does not exist (a typo would otherwise be found only
/// after the work), naming the path the user gave.
fn check_writable(path: &Path) -> Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !parent.is_dir() {
        return Err(Error::config(
            "output path",
            format!(
                "{}: the directory {} does not exist",
                path.display(),
                parent.display()
            ),
        ));
    }
    if path.is_dir() {
        return Err(Error::config(
            "output path",
            format!("{} is a directory", path.display()),
        ));
    }
    Ok(())
}

#[derive(Args)]
#[command(allow_negative_numbers = true)]
struct PreciseBnArgs {
    /// Fashion-MNIST directory (default: $BNLAB_DATA/fashion-mnist, else
    /// /usr/share/datasets/fashion-mnist; never downloaded).
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    /// The whole path in a minute or two: 600 steps, 2,000 test images, fewer draws.
    #[arg(long, conflicts_with_all = ["resume", "report_only"])]
    quick: bool,
    /// The study's folder: its progress, then its report.
    #[arg(long, default_value = "runs/precise-bn", value_name = "DIR")]
    out: PathBuf,
    /// Training steps of each run (default 12,000; --quick 600).
    #[arg(long, conflicts_with_all = ["resume", "report_only"])]
    steps: Option<i64>,
    /// Evaluate three ways (and checkpoint) every K steps (default 300; --quick 50).
    #[arg(long, value_name = "K", conflicts_with_all = ["resume", "report_only"])]
    eval_every: Option<i64>,
    /// L2 weight decay of both runs (default 5e-4).
    #[arg(long, value_name = "X", conflicts_with_all = ["resume", "report_only"])]
    weight_decay: Option<f32>,
    #[arg(long, default_value_t = 1, conflicts_with_all = ["resume", "report_only"])]
    seed: u64,
    #[command(flatten)]
    study: StudyDirArgs,
    #[command(flatten)]
    control: RunControl,
}

fn reproduce_precise_bn(a: PreciseBnArgs, stop: &bnlab::stop::Stop, ranks: &Ranks) -> Result<()> {
    use bnlab::experiments::precise_bn::{self as pbn, PreciseBnSetup};
    let mode = ranks.agree(a.control.mode())?;
    let make_setup = || -> Result<PreciseBnSetup> {
        let mut setup = if a.quick {
            PreciseBnSetup::quick()
        } else {
            PreciseBnSetup::default()
        };
        if let Some(n) = a.steps {
            setup.steps = positive("--steps", n)?;
        }
        if let Some(k) = a.eval_every {
            setup.eval_every = positive("--eval-every", k)?;
        }
        if let Some(w) = a.weight_decay {
            setup.weight_decay = w;
        }
        setup.seed = a.seed;
        setup.validate()?;
        Ok(setup)
    };
    let write = |dir: &Path, setup: &PreciseBnSetup, results: &[Option<pbn::RunResult>]| {
        let jobs = setup.jobs();
        report::write_precise_bn_report(
            dir,
            &report::PreciseBnReport {
                setup,
                jobs: &jobs,
                results,
            },
        )
    };
    if let Some(dir) = &a.study.report_only {
        if !ranks.lead() {
            // Rank 0 alone writes the report of a study kept on disk.
            return Ok(());
        }
        let study = Study::open(dir, "precise-bn")?;
        let setup: PreciseBnSetup = study.setup()?;
        let results = pbn::finished_results(&setup, &study)?;
        let missing = results.iter().filter(|r| r.is_none()).count();
        write(dir, &setup, &results)?;
        eprintln!(
            "wrote the report of {} finished runs ({missing} missing) to {}",
            results.len() - missing,
            dir.display()
        );
        return Ok(());
    }
    if a.study.resume.is_none() {
        ranks.agree(make_setup())?;
    }
    // Under mpirun: global BN sync (the second EMA follows the global batch's statistics).
    let study = open_or_create_study_on(
        "precise-bn",
        &a.study,
        &a.out,
        || serde_json::to_value(make_setup()?).map_err(|e| Error::config("setup", e.to_string())),
        a.data.as_deref(),
        stop,
        ranks,
        None,
        &|setup, dist| {
            let setup: PreciseBnSetup = serde_json::from_value(setup.clone())
                .map_err(|e| Error::config("setup", e.to_string()))?;
            pbn::check_data_parallel(&setup, dist)
        },
    )?;
    let setup: PreciseBnSetup = ranks.agree(study.setup())?;
    let split = discard_if_fresh(
        &a.study,
        &study,
        ranks.agree(data::fashion_mnist(
            study_data(&study, a.data.as_deref()).as_deref(),
        )),
    )?;
    let out = study.dir().to_path_buf();
    let lead = ranks.lead();
    let meter = StudyMeter::new(
        mode,
        "reproduce precise-bn",
        setup.lrs.len(),
        setup.steps,
        setup.workers,
    );
    let on_progress = |p: pbn::Progress<'_>| {
        if !lead {
            return;
        }
        meter.update(RunUpdate {
            slot: p.worker,
            label: p.label,
            step: p.step,
            steps: p.steps,
            loss: None,
            accuracy: p.accuracy,
            evaluated: p.evaluated,
            finished: p.finished,
        })
    };
    // Runs trained now report through the meter; runs read back are said once.
    let on_done = |job: &pbn::Job, r: &pbn::RunResult, resumed: bool| {
        if resumed && lead {
            meter.update(RunUpdate {
                slot: 0,
                label: &job.key(),
                step: r.diverged_at.unwrap_or(setup.steps),
                steps: setup.steps,
                loss: None,
                accuracy: r.population_full,
                evaluated: false,
                finished: true,
            });
            eprintln!("{} ({}): finished earlier", job.key(), job.name);
        }
    };
    let t0 = Instant::now();
    let result = pbn::run_study(&setup, &split, &study, &on_progress, &on_done);
    if lead {
        meter.finish();
    }
    let results = match result {
        Err(e @ Error::Stopped { .. }) => {
            if lead {
                report_stopped("precise-bn", &study, &meter, stop, &ranks.launcher());
            }
            return Err(e);
        }
        r => r?,
    };
    if !lead {
        return Ok(());
    }
    let results: Vec<Option<_>> = results.into_iter().map(Some).collect();
    write(&out, &setup, &results)?;
    eprintln!(
        "reproduce precise-bn: {}; wrote {}",
        fmt_duration(t0.elapsed().as_secs_f64()),
        display_dir(&out)
    );
    Ok(())
}
