//! `reproduce precise-bn` (Wu & Johnson 2021): the second EMA's bookkeeping against a network
//! trained with that BN momentum and against an f64 recurrence; the study end to end on
//! Fashion-MNIST with a small budget (outputs, results.json's layout and values, `--resume` on
//! a finished study); Ctrl-C, `--report-only` on the stopped study, and `--resume` giving the
//! uninterrupted study's results.json byte for byte.

mod common;

use bnlab::data::{Dataset, Pixels};
use bnlab::experiments::precise_bn::EmaStats;
use bnlab::kernels::batch_norm::RunningAverage;
use bnlab::network::Network;
use bnlab::nn::TensorMut;
use bnlab::optim::Schedule;
use bnlab::train::{Order, TrainConfig, Trainer};
use common::{bnlab, fashion_or_skip};

fn synthetic() -> Dataset {
    let mut rng = common::Lcg(5);
    let n = 256;
    let pixels = rng.vec_f32(n * 144, 0.5, 0.5);
    let labels: Vec<u8> = (0..n).map(|i| (i * 7 % 10) as u8).collect();
    Dataset::new(Pixels::F32(pixels), labels, [1, 12, 12], 10).unwrap()
}

fn vgg(seed: u64) -> Network {
    let spec = bnlab::model::preset("vgg-mini-bn").unwrap();
    let input = bnlab::model::resolve_input(&spec, Some(&[1, 12, 12])).unwrap();
    Network::build(&spec, &input, seed, 32, 1).unwrap()
}

/// (name, bits) of tensors.
type Tensors = Vec<(String, Vec<u32>)>;

/// Every tensor of the state: the running statistics, and the rest.
fn state(net: &mut Network) -> (Tensors, Tensors) {
    let (mut running, mut rest) = (Vec::new(), Vec::new());
    net.visit_state(&mut |name, _, t| {
        let bits: Vec<u32> = match t {
            TensorMut::F32(v) | TensorMut::F32T(v) => v.iter().map(|x| x.to_bits()).collect(),
            TensorMut::I64(v) => vec![*v as u32],
        };
        if name.ends_with("running_mean") || name.ends_with("running_var") {
            running.push((name.to_string(), bits));
        } else {
            rest.push((name.to_string(), bits));
        }
    });
    (running, rest)
}

/// One network keeps its own EMA (momentum 0.1) and a second one (0.01) beside it; another is
/// trained with BN momentum 0.01. Training is the same bit for bit, the second EMA equals the
/// other network's running statistics bit for bit, and both follow the f64 recurrence
/// `r <- 0.99 r + 0.01 s` of the recorded mini-batch statistics (variance unbiased).
#[test]
fn second_ema_equals_a_network_trained_with_that_bn_momentum() {
    let data = synthetic();
    let cfg = TrainConfig {
        steps: 40,
        batch_size: 32,
        lr: 0.2,
        momentum: 0.9,
        weight_decay: 0.0,
        schedule: Schedule::Constant,
        seed: 4,
        order: Order::Shuffle,
        eval_every: 0,
        threads: 1,
        augment: bnlab::train::Augment::None,
        bn: Default::default(),
    };
    let mut a = vgg(3);
    let mut b = vgg(3);
    b.for_each_batch_norm(&mut |bn| {
        bn.running_average = RunningAverage::Exponential { momentum: 0.01 }
    });
    let mut ema = EmaStats::new(&mut a, 0.01).unwrap();
    let (mut ta, mut tb) = (
        Trainer::new(cfg.clone(), data.len(), data.features()),
        Trainer::new(cfg, data.len(), data.features()),
    );
    // The f64 recurrence, from the batch statistics each step leaves in every layer.
    let mut want: Vec<(Vec<f64>, Vec<f64>)> = Vec::new();
    a.for_each_batch_norm(&mut |bn| want.push((vec![0.0; bn.c], vec![1.0; bn.c])));
    for _ in 0..40 {
        ta.step(&mut a, &data).unwrap();
        ema.update(&mut a, 32);
        tb.step(&mut b, &data).unwrap();
        let mut i = 0;
        a.for_each_batch_norm(&mut |bn| {
            let m = (32 * bn.s) as f64;
            let (bm, bv) = bn.batch_stats();
            for ch in 0..bn.c {
                want[i].0[ch] = 0.99 * want[i].0[ch] + 0.01 * bm[ch] as f64;
                want[i].1[ch] = 0.99 * want[i].1[ch] + 0.01 * m / (m - 1.0) * bv[ch] as f64;
            }
            i += 1;
        });
    }
    let (run_a, rest_a) = state(&mut a);
    let (run_b, rest_b) = state(&mut b);
    assert_eq!(rest_a, rest_b, "the BN momentum changed training");
    assert_ne!(
        run_a, run_b,
        "momenta 0.1 and 0.01 gave the same statistics"
    );
    let mut got = Vec::new();
    for (m, v) in ema.means().iter().zip(ema.vars()) {
        got.push(m.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        got.push(v.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    }
    let other: Vec<Vec<u32>> = run_b.into_iter().map(|(_, b)| b).collect();
    assert_eq!(got, other, "second EMA against BN momentum 0.01");
    for ((m, v), (wm, wv)) in ema.means().iter().zip(ema.vars()).zip(&want) {
        for (x, w) in m.iter().zip(wm).chain(v.iter().zip(wv)) {
            assert!(
                (*x as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{x} against the f64 recurrence's {w}"
            );
        }
    }
    // Swapping in exchanges the two sets; swapping back restores the network exactly.
    ema.swap(&mut a);
    assert_eq!(
        state(&mut a)
            .0
            .into_iter()
            .map(|(_, b)| b)
            .collect::<Vec<_>>(),
        other
    );
    ema.swap(&mut a);
    assert_eq!(state(&mut a).0, run_a);
}

fn run(args: &[&str]) -> String {
    let o = bnlab(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "{args:?}: {err}");
    err
}

fn results(dir: &std::path::Path) -> (Vec<u8>, serde_json::Value) {
    let bytes = std::fs::read(dir.join("results.json")).unwrap();
    let v = serde_json::from_slice(&bytes).unwrap();
    (bytes, v)
}

#[test]
fn precise_bn_study_runs_stops_and_resumes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let Some(fashion) = fashion_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let f = fashion.to_str().unwrap().to_string();
    let args = |out: &std::path::Path| -> Vec<String> {
        [
            "reproduce",
            "precise-bn",
            "--quick",
            "--steps",
            "200",
            "--eval-every",
            "50",
            "--data",
            &f,
            "--out",
            out.to_str().unwrap(),
            "--progress",
            "plain",
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = t.path().join("whole");
    let a = args(&whole);
    run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    for file in [
        "results.json",
        "timings.json",
        "metrics.csv",
        "samples.csv",
        "summary.md",
        "precise_bn.svg",
        "precise_bn.png",
    ] {
        assert!(whole.join(file).is_file(), "{file}");
    }
    let (first, r) = results(&whole);
    assert_eq!(r["setup"]["steps"], 200);
    assert_eq!(r["partial"], false);
    for (name, lr) in [("normal", 0.05), ("high", 1.0)] {
        let run = &r["runs"][name];
        assert_eq!(run["lr"], lr, "{name}");
        let curve = run["curve"].as_array().unwrap();
        let steps: Vec<u64> = curve.iter().map(|p| p["step"].as_u64().unwrap()).collect();
        assert_eq!(steps, [50, 100, 150, 200], "{name}");
        for p in curve {
            for k in ["ema", "ema_slow", "population"] {
                let a = p[k].as_f64().unwrap();
                assert!((0.0..=1.0).contains(&a), "{name} {k}: {p}");
            }
        }
        // 200 steps of a BN convnet are far above chance (10%) with population statistics,
        // and the slow EMA, still close to its start, is the worst early on.
        let last = curve.last().unwrap();
        assert!(last["population"].as_f64().unwrap() > 0.5, "{name}: {last}");
        assert!(
            curve[0]["ema_slow"].as_f64().unwrap() < curve[0]["population"].as_f64().unwrap(),
            "{name}: {}",
            curve[0]
        );
        let full = run["population_full"].as_f64().unwrap();
        assert!(full > 0.5 && full <= 1.0, "{name}: {full}");
        let samples = run["samples"].as_array().unwrap();
        let counts: Vec<u64> = samples
            .iter()
            .map(|s| s["examples"].as_u64().unwrap())
            .collect();
        assert_eq!(counts, [16, 64, 256, 1024, 4096]);
        for s in samples {
            let acc = s["accuracies"].as_array().unwrap();
            assert_eq!(acc.len(), 2);
            assert!(acc
                .iter()
                .all(|a| (0.0..=1.0).contains(&a.as_f64().unwrap())));
        }
        // With 4,096 examples the statistics are close to the whole training set's.
        let big = samples.last().unwrap()["mean"].as_f64().unwrap();
        assert!((big - full).abs() < 0.03, "{name}: {big} against {full}");
    }
    let claims = r["claims"].as_array().unwrap();
    assert_eq!(claims.len(), 7);
    assert!(claims
        .iter()
        .all(|c| c["holds"].is_boolean() && c["measured"].is_string()));
    let summary = std::fs::read_to_string(whole.join("summary.md")).unwrap();
    assert!(summary.contains("## The claims, checked against these runs"));
    assert!(!summary.contains("Partial report"));
    let csv = std::fs::read_to_string(whole.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 2 * 4);

    // Again with the same --out: refused; --resume on the finished study trains nothing.
    let o = bnlab(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"));
    let again = run(&[
        "reproduce",
        "precise-bn",
        "--resume",
        whole.to_str().unwrap(),
    ]);
    assert_eq!(again.matches("finished earlier").count(), 2, "{again}");
    assert_eq!(results(&whole).0, first);

    // Ctrl-C at the first evaluation: status 130 and the command that resumes.
    let cut = t.path().join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .args(args(&cut))
        .env_remove("BNLAB_DATA")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
            let _ = tx.send(line);
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let start = Instant::now();
    while !seen.iter().any(|l| l.contains("step 50 of 200")) {
        assert!(start.elapsed() < Duration::from_secs(120), "{seen:?}");
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(100)) {
            seen.push(l);
        }
    }
    let ok = Command::new("kill")
        .args(["-s", "INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let status = child.wait().unwrap();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(5)) {
        seen.push(l);
    }
    let log = seen.join("\n");
    assert_eq!(status.code(), Some(130), "{log}");
    assert!(log.contains("bnlab reproduce precise-bn --resume"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let c = cut.to_str().unwrap();
    // The report of the stopped study names its missing runs.
    let partial = run(&["reproduce", "precise-bn", "--report-only", c]);
    assert!(partial.contains("missing"), "{partial}");
    let (_, p) = results(&cut);
    assert_eq!(p["partial"], true);
    assert_eq!(p["missing_runs"].as_array().unwrap().len(), 2, "{p}");
    assert!(std::fs::read_to_string(cut.join("summary.md"))
        .unwrap()
        .contains("Partial report"));
    // Resumed from the checkpoints: the uninterrupted study's results.json, byte for byte.
    run(&["reproduce", "precise-bn", "--resume", c]);
    assert_eq!(results(&cut).0, first);
}
