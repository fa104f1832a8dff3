//! `reproduce ics` on a tiny budget, through the library: the results' structure, that the
//! measurements leave training exactly as it would be without them (the curves of a plain
//! training run, bit for bit, and the last ICS measurement equal to one made afterwards), and
//! that a study stopped mid-run and resumed gives the uninterrupted study's results.
//! `reproduce ics --quick` through the command line: its files and claims.

mod common;

use bnlab::data::Split;
use bnlab::experiments::ics::{self, IcsSetup, RunResult};
use bnlab::model::{self, NormChoice};
use bnlab::network::Network;
use bnlab::optim::Schedule;
use bnlab::stop::Stop;
use bnlab::study::Study;
use bnlab::train::{train_loop, Evaluator, LossSince, Observer, Order, TrainConfig, Trainer};
use common::{fashion_or_skip, mnist_or_skip};

fn tiny() -> IcsSetup {
    let mut s = IcsSetup::default();
    let vgg = &mut s.nets[0];
    (
        vgg.steps,
        vgg.batch_size,
        vgg.eval_every,
        vgg.measure_every,
        vgg.probe_every,
    ) = (12, 16, 6, 4, 2);
    let mlp = &mut s.nets[1];
    (
        mlp.steps,
        mlp.batch_size,
        mlp.eval_every,
        mlp.measure_every,
        mlp.probe_every,
    ) = (60, 20, 30, 20, 10);
    s
}

fn data() -> Option<(Split, Split)> {
    let fashion = fashion_or_skip()?;
    let mnist = mnist_or_skip()?;
    Some((
        bnlab::data::fashion_mnist(Some(&fashion)).unwrap(),
        bnlab::data::mnist(Some(&mnist), false).unwrap(),
    ))
}

fn study(dir: &std::path::Path, setup: &IcsSetup) -> Study {
    Study::create(dir, "ics", serde_json::to_value(setup).unwrap(), None).unwrap()
}

/// Results without the wall-clock seconds.
fn comparable(r: &[RunResult]) -> Vec<RunResult> {
    r.iter()
        .map(|r| RunResult {
            seconds: 0.0,
            ..r.clone()
        })
        .collect()
}

/// Collects the mean training loss at each evaluation, as the study's curve has it.
struct Losses(Vec<(usize, f64)>);

impl Observer for Losses {
    fn evaluate(&mut self, _: &mut Network, step: usize, mean_loss: f64) -> bnlab::Result<()> {
        self.0.push((step, mean_loss));
        Ok(())
    }
}

#[test]
fn study_measures_without_disturbing_training_and_resumes_exactly() {
    let Some((fashion, mnist)) = data() else {
        return;
    };
    let setup = tiny();
    let splits = [&fashion, &mnist];
    let t = tempfile::tempdir().unwrap();
    let whole = study(&t.path().join("whole"), &setup);
    let t0 = std::time::Instant::now();
    let results = ics::run_study(&setup, &splits, &whole, &|_| {}).unwrap();
    let took = t0.elapsed();
    let jobs = setup.jobs();
    assert_eq!(results.len(), 6);
    for (job, r) in jobs.iter().zip(&results) {
        let n = &setup.nets[job.net];
        let k = &job.key;
        assert_eq!(r.accuracy.len(), n.steps / n.eval_every, "{k}");
        assert_eq!(r.inputs.len(), n.steps / n.probe_every, "{k}");
        assert_eq!(r.measurements.len(), n.steps / n.measure_every, "{k}");
        assert_eq!(r.layers.len(), 4, "{k}: {:?}", r.layers);
        let etas: Vec<f64> = setup.eta_factors.iter().map(|f| f * n.lr).collect();
        assert_eq!(r.etas, etas, "{k}");
        for p in &r.inputs {
            assert!(p.p15 <= p.p50 && p.p50 <= p.p85, "{k}: {p:?}");
            assert!(p.p85 > p.p15, "{k}: a channel with no spread: {p:?}");
        }
        for m in &r.measurements {
            // Nothing comes before the first weight layer: G' = G.
            assert_eq!(m.ics[0].l2_diff, 0.0, "{k}");
            assert_eq!(m.ics[0].cosine, Some(1.0), "{k}");
            for v in &m.ics[1..] {
                assert!(v.l2_diff > 0.0 && v.grad_norm > 0.0, "{k}: {v:?}");
                assert!(v.cosine.is_some_and(|c| c.abs() <= 1.0 + 1e-12), "{k}");
            }
            assert_eq!(m.losses.len(), etas.len(), "{k}");
            assert!(m.loss_range() >= 0.0 && m.max_grad_change() > 0.0, "{k}");
            assert!(m.beta_smoothness.is_some_and(|b| b > 0.0), "{k}");
        }
        let acc = r.final_test_accuracy.unwrap();
        assert_eq!(Some(acc), r.accuracy.last().map(|p| p.test_accuracy), "{k}");
        // Trained from the same weights and order; noisy BN's noise also follows the seed.
        assert!((0.0..=1.0).contains(&acc), "{k}");
    }

    // The measurements change nothing: the same run without them has the same training loss
    // at every evaluation and the same test accuracy, bit for bit; and an ICS measurement
    // made afterwards on the trained network equals the study's last one.
    for (job, r) in jobs.iter().zip(&results) {
        let n = &setup.nets[job.net];
        let split = splits[job.net];
        let spec = model::apply_norm(
            &model::preset(&n.model).unwrap(),
            NormChoice::parse(&job.norm).unwrap(),
        )
        .unwrap();
        let input = model::resolve_input(&spec, Some(&split.train.shape())).unwrap();
        let mut net = Network::build(
            &spec,
            &input,
            setup.seed,
            n.batch_size.max(setup.eval_batch),
            1,
        )
        .unwrap();
        let config = TrainConfig {
            steps: n.steps,
            batch_size: n.batch_size,
            lr: n.lr,
            momentum: n.momentum,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            seed: setup.seed,
            order: Order::Shuffle,
            eval_every: n.eval_every,
            threads: 1,
            augment: bnlab::train::Augment::None,
            bn: Default::default(),
        };
        let mut trainer = Trainer::new(config, split.train.len(), split.train.features());
        let mut losses = Losses(Vec::new());
        train_loop(
            &mut net,
            &mut trainer,
            &split.train,
            n.steps,
            n.eval_every,
            &mut LossSince::default(),
            &mut losses,
        )
        .unwrap();
        let study_losses: Vec<(usize, f64)> =
            r.accuracy.iter().map(|p| (p.step, p.train_loss)).collect();
        assert_eq!(losses.0, study_losses, "{}", job.key);
        let acc = Evaluator::new(setup.eval_batch, split.train.features())
            .evaluate(&mut net, &split.test, None, None)
            .unwrap()
            .accuracy();
        assert_eq!(Some(acc), r.final_test_accuracy, "{}", job.key);
        let again = bnlab::probe::ics(&mut net, &split.train, 0, n.batch_size, n.lr).unwrap();
        let last = r.measurements.last().unwrap();
        for (a, b) in again.iter().zip(&last.ics) {
            assert_eq!(
                (a.l2_diff, a.cosine, a.grad_norm),
                (b.l2_diff, b.cosine, b.grad_norm)
            );
        }
    }

    // Stopped in the middle, then resumed: the same results. The stop comes from another
    // thread after a fraction of the uninterrupted study's time; the runs in training then
    // write their checkpoints. Machines differ in load, so a stop that happened to fall
    // between runs (no checkpoint) is tried again later in the study.
    let mut stopped_dir = None;
    for (attempt, frac) in [0.3, 0.45, 0.6, 0.15, 0.75].into_iter().enumerate() {
        let dir = t.path().join(format!("stopped{attempt}"));
        let stop = Stop::new();
        let stopped = study(&dir, &setup).with_stop(stop.clone());
        let first = std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(took.mul_f64(frac));
                stop.request(2);
            });
            ics::run_study(&setup, &splits, &stopped, &|_| {})
        });
        if !matches!(first, Err(bnlab::Error::Stopped { .. })) {
            continue;
        }
        let checkpoints = std::fs::read_dir(dir.join("runs"))
            .unwrap()
            .flatten()
            .filter(|e| e.path().join("checkpoint.safetensors").is_file())
            .count();
        if checkpoints > 0 {
            stopped_dir = Some(dir);
            break;
        }
    }
    let dir = stopped_dir.expect("no stop landed inside a run in five tries");
    let resumed = Study::open(&dir, "ics").unwrap();
    let finished = ics::finished_results(&setup, &resumed).unwrap();
    assert!(
        finished.iter().any(Option::is_none),
        "every run had finished"
    );
    let again = ics::run_study(&setup, &splits, &resumed, &|_| {}).unwrap();
    assert_eq!(comparable(&again), comparable(&results));
}

#[test]
fn quick_study_writes_its_report_and_claims() {
    let (Some(fashion), Some(mnist)) = (fashion_or_skip(), mnist_or_skip()) else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("q");
    let o = common::bnlab(&[
        "reproduce",
        "ics",
        "--quick",
        "--data",
        fashion.to_str().unwrap(),
        "--mnist",
        mnist.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    assert!(
        log.contains("[6/6]") && log.contains("claims hold"),
        "{log}"
    );
    for f in [
        "results.json",
        "timings.json",
        "metrics.csv",
        "summary.md",
        "accuracy.svg",
        "accuracy.png",
        "inputs-vgg.svg",
        "ics-mlp.png",
        "landscape-vgg.svg",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    let claims = r["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 8);
    for c in claims {
        assert!(c["holds"].is_boolean(), "{c}");
    }
    for net in ["vgg", "mlp"] {
        for v in ["standard", "bn", "noisy-bn"] {
            let run = &r["nets"][net]["variants"][v];
            assert!(run["final_test_accuracy"].is_number(), "{net} {v}");
            assert!(
                run["summary"]["relative_input_shift"].is_number(),
                "{net} {v}"
            );
            assert!(
                run.get("seconds").is_none(),
                "timings belong in timings.json"
            );
        }
    }
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        summary.contains("| claim | measured | holds |"),
        "{summary}"
    );
    // Report-only on the finished study writes the same results.json.
    let before = std::fs::read(out.join("results.json")).unwrap();
    common::ok(&["reproduce", "ics", "--report-only", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(out.join("results.json")).unwrap(), before);
}
