//! `--norm`, `--freeze-bn` and `--renorm-schedule` on the command line, on a small synthetic
//! data set: what each normalizer changes in a run, what it keeps (checkpoint names), and the
//! clear errors for values that make no sense.

mod common;

use bnlab::checkpoint::TensorFile;
use common::{fails_with, ok, synthetic_mnist};
use std::path::Path;

fn tensors(path: &Path) -> TensorFile {
    TensorFile::read(path).unwrap()
}

fn keys(f: &TensorFile) -> Vec<String> {
    f.tensors.keys().cloned().collect()
}

fn train(data: &Path, save: &Path, extra: &[&str]) {
    let (d, s) = (data.to_str().unwrap(), save.to_str().unwrap());
    let mut args = vec![
        "train",
        "--model",
        "mlp-fig1-bn",
        "--data",
        d,
        "--steps",
        "20",
        "--batch-size",
        "20",
        "--eval-every",
        "0",
        "--save",
        s,
        "--no-download",
    ];
    args.extend_from_slice(extra);
    ok(&args);
}

/// Batch renorm and ghost BN keep batch norm's checkpoint names (their checkpoints load as
/// BN's); `none` drops the BN tensors and gives the linear layers biases. Ghost batches as
/// large as the batch train exactly as BN; smaller ones do not; batch renorm starts as BN
/// (its warm-up) and then differs once r and d are free.
#[test]
fn normalizers_replace_batch_norm_under_its_names() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    synthetic_mnist(&data, 200, 50);
    let run = |name: &str, extra: &[&str]| {
        let p = t.path().join(format!("{name}.safetensors"));
        train(&data, &p, extra);
        tensors(&p)
    };
    let bn = run("bn", &[]);
    let ghost_all = run("ghost20", &["--norm", "ghost:20"]);
    let ghost = run("ghost5", &["--norm", "ghost:5"]);
    let brn_warm = run("brnwarm", &["--norm", "brn", "--renorm-schedule", "1,1,1"]);
    let brn = run("brn", &["--norm", "brn", "--renorm-schedule", "0,0,0"]);
    let none = run("none", &["--norm", "none"]);
    for f in [&ghost_all, &ghost, &brn, &brn_warm] {
        assert_eq!(keys(f), keys(&bn));
    }
    let w = |f: &TensorFile| f.f32s("0.weight").unwrap();
    assert_eq!(
        w(&ghost_all),
        w(&bn),
        "a ghost batch of the whole batch is BN"
    );
    assert_eq!(w(&brn_warm), w(&bn), "renorm in its warm-up is BN");
    assert_ne!(w(&ghost), w(&bn));
    assert_ne!(w(&brn), w(&bn));
    assert!(keys(&none).iter().all(|k| !k.contains("running")));
    assert!(keys(&none).contains(&"0.bias".to_string()));
    // A batch-renorm checkpoint is a BN checkpoint: eval without --norm reads it.
    let d = data.to_str().unwrap();
    let brn_path = t.path().join("brn.safetensors");
    let as_bn = ok(&[
        "eval",
        "--model",
        "mlp-fig1-bn",
        "--weights",
        brn_path.to_str().unwrap(),
        "--data",
        d,
        "--no-download",
    ]);
    let as_brn = ok(&[
        "eval",
        "--model",
        "mlp-fig1-bn",
        "--norm",
        "brn",
        "--weights",
        brn_path.to_str().unwrap(),
        "--data",
        d,
        "--no-download",
    ]);
    let acc = |s: &str| {
        s.split("test accuracy")
            .nth(1)
            .unwrap()
            .split('%')
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(acc(&as_bn), acc(&as_brn), "{as_bn} / {as_brn}");
}

/// Frozen BN keeps the starting running statistics (`running`) or replaces them once with
/// Algorithm 2's (`population`), while the weights and gamma learn.
#[test]
fn frozen_batch_norm_keeps_its_statistics() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    synthetic_mnist(&data, 200, 50);
    let init = t.path().join("init.safetensors");
    train(&data, &init, &[]);
    let i = init.to_str().unwrap();
    let frozen = t.path().join("frozen.safetensors");
    train(&data, &frozen, &["--init", i, "--freeze-bn"]);
    let pop = t.path().join("pop.safetensors");
    train(&data, &pop, &["--init", i, "--freeze-bn", "population"]);
    let free = t.path().join("free.safetensors");
    train(&data, &free, &["--init", i]);
    let (a, f, p, u) = (
        tensors(&init),
        tensors(&frozen),
        tensors(&pop),
        tensors(&free),
    );
    let rm = |t: &TensorFile| t.f32s("1.running_mean").unwrap();
    assert_eq!(rm(&f), rm(&a), "frozen: the running statistics of --init");
    assert_ne!(rm(&u), rm(&a), "unfrozen: they move");
    assert_ne!(rm(&p), rm(&a), "population: replaced once");
    let tracked = |t: &TensorFile| format!("{:?}", t.tensors["1.num_batches_tracked"].1);
    assert_eq!(tracked(&f), tracked(&a), "frozen layers count no batches");
    assert_ne!(f.f32s("0.weight").unwrap(), a.f32s("0.weight").unwrap());
    assert_ne!(
        f.f32s("1.weight").unwrap(),
        a.f32s("1.weight").unwrap(),
        "gamma learns"
    );
}

#[test]
fn bad_normalizer_flags_are_named() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    synthetic_mnist(&data, 40, 10);
    let d = data.to_str().unwrap();
    let base = [
        "train",
        "--model",
        "mlp-fig1-bn",
        "--data",
        d,
        "--steps",
        "2",
        "--no-download",
    ];
    fn with<'a>(base: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [base, extra].concat()
    }
    fails_with(&with(&base, &["--norm", "gn:0"]), &["--norm", "gn:0"]);
    fails_with(
        &with(&base, &["--norm", "batch"]),
        &["--norm", "unknown normalizer"],
    );
    fails_with(&with(&base, &["--norm", "brn:0.5:1"]), &["--norm", "RMAX"]);
    fails_with(
        &with(&base, &["--freeze-bn", "always"]),
        &["--freeze-bn", "running or population"],
    );
    fails_with(
        &with(&base, &["--renorm-schedule", "0.5,0.2,0.6"]),
        &["--renorm-schedule"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1",
            "--data",
            d,
            "--steps",
            "2",
            "--norm",
            "brn",
            "--no-download",
        ],
        &["--norm", "has no BatchNorm"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1",
            "--data",
            d,
            "--steps",
            "2",
            "--freeze-bn",
            "--no-download",
        ],
        &["--freeze-bn", "no BatchNorm to freeze"],
    );
}

/// `grad --norm ghost:G`: the gradient of a batch of 20 in ghost batches of 20 is BN's, in
/// ghost batches of 10 it is not.
#[test]
fn grad_takes_norm() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    synthetic_mnist(&data, 100, 10);
    let w = t.path().join("w.safetensors");
    train(&data, &w, &[]);
    let grad = |norm: &str| {
        let out = t
            .path()
            .join(format!("g-{}.safetensors", norm.replace(':', "")));
        ok(&[
            "grad",
            "--model",
            "mlp-fig1-bn",
            "--weights",
            w.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--batch-size",
            "20",
            "--norm",
            norm,
            "--save",
            out.to_str().unwrap(),
            "--no-download",
        ]);
        tensors(&out).f32s("0.weight").unwrap()
    };
    let bn = grad("bn");
    assert_eq!(grad("ghost:20"), bn);
    assert_ne!(grad("ghost:10"), bn);
}

/// Every preset with BN takes every `--norm`: the rewritten network builds and trains a step
/// on a batch (finite loss), keeps the module names of the original's weights, and only
/// `bn`, `brn` and `ghost` keep the running statistics.
#[test]
fn every_bn_preset_takes_every_norm() {
    use bnlab::model::{self, NormChoice};
    use bnlab::network::Network;
    let mut rng = common::Lcg(4);
    for name in model::preset_names() {
        let spec = model::preset(name).unwrap();
        if !spec.has_batch_norm() {
            continue;
        }
        let input = model::resolve_input(&spec, Some(&[1, 28, 28])).unwrap();
        let names = |net: &mut Network| {
            let mut v = Vec::new();
            net.visit_state(&mut |n, _, _| v.push(n.to_string()));
            v
        };
        let mut base = Network::build(&spec, &input, 1, 4, 1).unwrap();
        let base_names = names(&mut base);
        for norm in ["bn", "gn:4", "ln", "brn", "ghost:2", "noisy-bn", "none"] {
            let choice = NormChoice::parse(norm).unwrap();
            let s = model::apply_norm(&spec, choice).unwrap();
            let mut net = Network::build(&s, &input, 1, 4, 1)
                .unwrap_or_else(|e| panic!("{name} --norm {norm}: {e}"));
            let x = rng.vec_f32(4 * 784, 0.5, 0.5);
            let loss = net.forward_backward(&x, &[0, 1, 2, 3], 4).unwrap();
            assert!(loss.is_finite(), "{name} --norm {norm}: loss {loss}");
            let got = names(&mut net);
            let keeps_stats = matches!(norm, "bn" | "brn" | "ghost:2" | "noisy-bn");
            assert_eq!(
                got.iter().any(|n| n.ends_with("running_mean")),
                keeps_stats,
                "{name} --norm {norm}"
            );
            if keeps_stats {
                assert_eq!(got, base_names, "{name} --norm {norm}: the names of BN");
            }
            if norm == "gn:4" || norm == "ln" {
                // Same weights and affine parameters under the same names, no BN buffers.
                let want: Vec<&String> = base_names
                    .iter()
                    .filter(|n| !n.contains("running_") && !n.contains("num_batches"))
                    .collect();
                assert_eq!(got.iter().collect::<Vec<_>>(), want, "{name} --norm {norm}");
            }
        }
    }
}

/// The studies take `--norm` too: recorded in the setup, said at the top of the summary;
/// nonsense is refused before anything runs.
#[test]
fn studies_take_norm() {
    let Some(mnist) = common::mnist_or_skip() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("m");
    ok(&[
        "reproduce",
        "mnist",
        "--data",
        mnist.to_str().unwrap(),
        "--steps",
        "100",
        "--eval-every",
        "50",
        "--norm",
        "ln",
        "--out",
        out.to_str().unwrap(),
        "--progress",
        "plain",
    ]);
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("results.json")).unwrap()).unwrap();
    assert_eq!(r["setup"]["norm"], "ln", "{}", r["setup"]);
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("Run with `--norm ln`"), "{summary}");
    let bad = t.path().join("bad");
    fails_with(
        &[
            "reproduce",
            "inception",
            "--quick",
            "--norm",
            "gn:0",
            "--out",
            bad.to_str().unwrap(),
        ],
        &["--norm", "gn:0"],
    );
}
