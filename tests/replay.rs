//! End-to-end cases made with PyTorch (`../shared/reference/replay`, or
//! `$BNLAB_REFERENCE_DIR/replay`; see ../shared/reference/README.md): K SGD steps
//! from a PyTorch checkpoint on sequential MNIST batches must end where PyTorch ended, tensor by
//! tensor (relative L2 error at most the case's tolerance, `num_batches_tracked` exactly), and a
//! PyTorch-trained checkpoint must classify PyTorch's count of test images correctly. Also: the
//! determinism promise and checkpoint round trips.

mod common;

use bnlab::checkpoint::{self, Loaded, TensorFile};
use bnlab::data::{load_mnist_dir, Split};
use bnlab::network::Network;
use bnlab::nn::TensorMut;
use bnlab::optim::Schedule;
use bnlab::train::{Evaluator, Order, TrainConfig, Trainer};
use std::path::Path;
use std::sync::OnceLock;

fn fashion() -> Option<&'static Split> {
    static DATA: OnceLock<Option<Split>> = OnceLock::new();
    DATA.get_or_init(|| {
        common::fashion_dir()
            .map(|d| bnlab::data::fashion_mnist(Some(&d)).expect("Fashion-MNIST loads"))
    })
    .as_ref()
}

fn mnist() -> Option<&'static Split> {
    static DATA: OnceLock<Option<Split>> = OnceLock::new();
    DATA.get_or_init(|| common::mnist_dir().map(|d| load_mnist_dir(&d).expect("MNIST loads")))
        .as_ref()
}

fn config(
    steps: usize,
    batch: usize,
    lr: f64,
    momentum: f32,
    wd: f32,
    order: Order,
) -> TrainConfig {
    TrainConfig {
        steps,
        batch_size: batch,
        lr,
        momentum,
        weight_decay: wd,
        schedule: Schedule::Constant,
        seed: 1,
        order,
        eval_every: 0,
        threads: 1,
        augment: bnlab::train::Augment::None,
        bn: Default::default(),
    }
}

fn train(net: &mut Network, data: &Split, cfg: TrainConfig) {
    let mut t = Trainer::new(cfg.clone(), data.train.len(), data.train.features());
    for _ in 0..cfg.steps {
        t.step(net, &data.train).unwrap();
    }
}

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, e)| (g - e).powi(2)).sum();
    let den: f64 = want.iter().map(|e| e * e).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[test]
fn pytorch_replay_cases() {
    let Some(dir) = common::shared_reference_dir()
        .map(|d| d.join("replay"))
        .filter(|d| d.join("cases.json").is_file())
    else {
        common::skip("../shared/reference/replay not present; PyTorch replay cases");
        return;
    };
    let Some(data) = mnist() else {
        common::skip("MNIST not present; PyTorch replay cases");
        return;
    };
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut ran = 0;
    for (name, case) in cases.as_object().unwrap() {
        let preset = case["model"].as_str().unwrap();
        let data = match case["data"].as_str().unwrap() {
            "mnist" => data,
            "fashion-mnist" => match fashion() {
                Some(d) => d,
                None => {
                    // .ci/run installs it; elsewhere: apt-get install dataset-fashion-mnist
                    common::skip(&format!("{name}: Fashion-MNIST not present"));
                    continue;
                }
            },
            other => panic!("{name}: unknown data set {other}"),
        };
        if let Some(init) = case.get("init").and_then(|v| v.as_str()) {
            let steps = case["steps"].as_u64().unwrap() as usize;
            let batch = case["batch_size"].as_u64().unwrap() as usize;
            assert_eq!(case["order"], "sequential");
            let cfg = config(
                steps,
                batch,
                case["lr"].as_f64().unwrap(),
                case["momentum"].as_f64().unwrap() as f32,
                case["weight_decay"].as_f64().unwrap() as f32,
                Order::Sequential,
            );
            let mut net = Network::preset(preset, 0, batch, 1).unwrap();
            checkpoint::load(&mut net, &dir.join(init)).unwrap();
            train(&mut net, data, cfg);
            let tmp = tempfile::tempdir().unwrap();
            let out = tmp.path().join("ours.safetensors");
            checkpoint::save(&mut net, &out).unwrap();
            let ours = TensorFile::read(&out).unwrap();
            let want = TensorFile::read(&dir.join(case["expected"].as_str().unwrap())).unwrap();
            let tol = case["tolerance_rel_l2"].as_f64().unwrap();
            assert_eq!(
                ours.tensors.keys().collect::<Vec<_>>(),
                want.tensors.keys().collect::<Vec<_>>(),
                "{name}: tensor names"
            );
            let mut worst = 0.0f64;
            for (key, (shape, data)) in &want.tensors {
                assert_eq!(
                    ours.shape(key).unwrap(),
                    shape.as_slice(),
                    "{name}: {key} shape"
                );
                match data {
                    Loaded::I64(v) => match &ours.tensors[key].1 {
                        Loaded::I64(o) => assert_eq!(o, v, "{name}: {key}"),
                        _ => panic!("{name}: {key} must be I64"),
                    },
                    _ => {
                        let e = rel_l2(&ours.f64s(key).unwrap(), &want.f64s(key).unwrap());
                        assert!(e <= tol, "{name}: {key} relative L2 error {e:.3e} > {tol}");
                        worst = worst.max(e);
                    }
                }
            }
            println!(
                "{name}: {steps} steps, worst relative L2 error {worst:.3e} (tolerance {tol})"
            );
            ran += 1;
        } else {
            let weights = dir.join(case["weights"].as_str().unwrap());
            let mut net = Network::preset(preset, 0, 500, 1).unwrap();
            checkpoint::load(&mut net, &weights).unwrap();
            let ev = Evaluator::new(500, 784)
                .evaluate(&mut net, &data.test, None, None)
                .unwrap();
            let want = case["test_correct"].as_u64().unwrap() as usize;
            assert_eq!(ev.correct, want, "{name}: correct test images");
            println!("{name}: {} / {} correct, as PyTorch", ev.correct, ev.total);
            ran += 1;
        }
    }
    assert!(ran >= 2, "no MLP replay case ran");
}

fn state_bytes(net: &mut Network) -> Vec<u8> {
    let mut out = Vec::new();
    net.visit_state(&mut |name, _, mut t| {
        out.extend_from_slice(name.as_bytes());
        if let Some(v) = t.floats() {
            out.extend(v.iter().flat_map(|x| x.to_bits().to_le_bytes()));
        } else if let TensorMut::I64(v) = t {
            out.extend(v.to_le_bytes());
        }
    });
    out
}

#[test]
fn same_seed_and_threads_give_bit_identical_results() {
    let Some(data) = mnist() else {
        common::skip("MNIST not present");
        return;
    };
    for preset in ["mlp-fig1", "mlp-fig1-bn"] {
        let mut by_threads = Vec::new();
        for threads in [1, 2] {
            let run = || {
                let mut net = Network::preset(preset, 7, 60, threads).unwrap();
                train(
                    &mut net,
                    data,
                    TrainConfig {
                        threads,
                        augment: bnlab::train::Augment::None,
                        bn: Default::default(),
                        seed: 7,
                        ..config(300, 60, 0.1, 0.9, 1e-4, Order::Shuffle)
                    },
                );
                state_bytes(&mut net)
            };
            let (a, b) = (run(), run());
            assert!(a == b, "{preset:?} with {threads} threads: two runs differ");
            by_threads.push(a);
        }
        // Stronger than promised: every parallel split computes each output exactly as one
        // thread does, so the thread count does not change the result either.
        assert!(
            by_threads[0] == by_threads[1],
            "{preset:?}: 1 and 2 threads differ"
        );
        // A different seed gives a different run (the check above can fail).
        let mut n1 = Network::preset(preset, 7, 60, 1).unwrap();
        let mut n2 = Network::preset(preset, 8, 60, 1).unwrap();
        assert!(state_bytes(&mut n1) != state_bytes(&mut n2));
    }
}

#[test]
fn checkpoints_round_trip_and_refuse_other_models() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bn.safetensors");
    let mut a = Network::preset("mlp-fig1-bn", 3, 60, 1).unwrap();
    a.for_each_batch_norm(&mut |bn| {
        bn.running_mean[0] = 0.25;
        bn.num_batches_tracked = 42;
    });
    checkpoint::save(&mut a, &p).unwrap();
    assert!(!tmp.path().join("bn.safetensors.tmp").exists());
    let mut b = Network::preset("mlp-fig1-bn", 4, 60, 1).unwrap();
    checkpoint::load(&mut b, &p).unwrap();
    assert!(state_bytes(&mut a) == state_bytes(&mut b));
    let f = TensorFile::read(&p).unwrap();
    assert_eq!(f.shape("0.weight").unwrap(), &[100, 784]);
    assert!(matches!(f.tensors["1.num_batches_tracked"].1, Loaded::I64(ref v) if v == &[42]));

    let mut plain = Network::preset("mlp-fig1", 4, 60, 1).unwrap();
    let e = checkpoint::load(&mut plain, &p).unwrap_err().to_string();
    assert!(e.contains("for mlp-fig1-bn, not mlp-fig1"), "{e}");
    let q = tmp.path().join("plain.safetensors");
    checkpoint::save(&mut plain, &q).unwrap();
    let e = checkpoint::load(&mut b, &q).unwrap_err().to_string();
    assert!(e.contains("for mlp-fig1, not mlp-fig1-bn"), "{e}");

    std::fs::write(tmp.path().join("junk"), b"not a checkpoint at all").unwrap();
    let e = checkpoint::load(&mut b, &tmp.path().join("junk"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a safetensors file"), "{e}");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(tmp.path().join("cut"), &bytes[..bytes.len() / 2]).unwrap();
    assert!(checkpoint::load(&mut b, &tmp.path().join("cut")).is_err());
    let e = checkpoint::load(&mut b, Path::new("/nonexistent/x.safetensors")).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/x.safetensors"));
}
