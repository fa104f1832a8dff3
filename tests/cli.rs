//! The `bnlab` command line as a user meets it: bad input gets a clear message naming the flag
//! or file and a non-zero exit status (never a panic); the commands do what they say.

mod common;

use common::{bnlab, fails_with};

use std::path::Path;
use std::process::Output;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn nonsense_flags_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    common::synthetic_mnist(tmp.path(), 120, 20);
    let d = tmp.path().to_str().unwrap();
    fails_with(
        &["train", "--model", "mlp-fig1", "--frobnicate"],
        &["--frobnicate"],
    );
    fails_with(
        &["train", "--model", "resnet", "--data", d],
        &["'resnet' is neither a preset", "resnet20-bn"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1",
            "--data",
            d,
            "--batch-size",
            "0",
        ],
        &["--batch-size"],
    );
    fails_with(
        &["train", "--model", "mlp-fig1", "--data", d, "--steps", "-5"],
        &["--steps"],
    );
    fails_with(
        &["train", "--model", "mlp-fig1", "--data", d, "--lr", "NaN"],
        &["--lr"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1",
            "--data",
            d,
            "--momentum",
            "1.5",
        ],
        &["--momentum"],
    );
    fails_with(
        &[
            "train", "--model", "mlp-fig1", "--data", d, "--order", "random",
        ],
        &["--order"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1",
            "--data",
            d,
            "--schedule",
            "cosine",
        ],
        &["--schedule"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1-bn",
            "--data",
            d,
            "--batch-size",
            "1",
        ],
        &["--batch-size", "at least 2"],
    );
    fails_with(
        &[
            "eval",
            "--model",
            "mlp-fig1",
            "--weights",
            "x",
            "--bn-stats",
            "median",
        ],
        &["--bn-stats"],
    );
}

#[test]
fn missing_data_and_bad_checkpoints_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("nothing-here");
    let e = empty.to_str().unwrap();
    fails_with(
        &["train", "--model", "mlp-fig1", "--data", e, "--no-download"],
        &["train-images-idx3-ubyte", "nothing-here"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "inception-mini-bn",
            "--data",
            e,
            "--steps",
            "1",
        ],
        &["cannot use --data", "nothing-here"],
    );
    // A resumed run keeps its own settings: training flags beside --resume are refused.
    fails_with(
        &["train", "--resume", e, "--lr", "0.5"],
        &["--resume", "--lr"],
    );
    let data = tmp.path().join("data");
    common::synthetic_mnist(&data, 120, 20);
    let d = data.to_str().unwrap();
    let junk = tmp.path().join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all").unwrap();
    fails_with(
        &[
            "eval",
            "--model",
            "mlp-fig1",
            "--weights",
            junk.to_str().unwrap(),
            "--data",
            d,
        ],
        &["junk.safetensors", "not a safetensors file"],
    );
    fails_with(
        &[
            "eval",
            "--model",
            "mlp-fig1",
            "--weights",
            "/no/such/file.safetensors",
            "--data",
            d,
        ],
        &["/no/such/file.safetensors"],
    );
    // A checkpoint of the BN net given to the plain net.
    let bn = tmp.path().join("bn.safetensors");
    let o = bnlab(&[
        "train",
        "--model",
        "mlp-fig1-bn",
        "--data",
        d,
        "--steps",
        "20",
        "--eval-every",
        "0",
        "--save",
        bn.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    fails_with(
        &[
            "eval",
            "--model",
            "mlp-fig1",
            "--weights",
            bn.to_str().unwrap(),
            "--data",
            d,
        ],
        &["bn.safetensors", "mlp-fig1"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1",
            "--init",
            bn.to_str().unwrap(),
            "--data",
            d,
            "--steps",
            "1",
        ],
        &["bn.safetensors"],
    );
}

#[test]
fn train_save_eval_round_trip_with_both_kinds_of_statistics() {
    let Some(d) = common::mnist_or_skip() else {
        return;
    };
    let d = d.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = bnlab(&[
        "train",
        "--model",
        "mlp-fig1-bn",
        "--data",
        d,
        "--steps",
        "600",
        "--eval-every",
        "300",
        "--out",
        out.to_str().unwrap(),
        "--lr",
        "0.5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
    let w = out.join("final.safetensors");
    for stats in ["running", "population"] {
        let o = bnlab(&[
            "eval",
            "--model",
            "mlp-fig1-bn",
            "--weights",
            w.to_str().unwrap(),
            "--data",
            d,
            "--bn-stats",
            stats,
            "--json",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let text = stdout(&o);
        let last = text.lines().last().unwrap();
        let j: serde_json::Value = serde_json::from_str(last).unwrap();
        assert_eq!(j["total"], 10000);
        let acc = j["accuracy"].as_f64().unwrap();
        assert!(acc > 0.85, "{stats}: accuracy {acc} after 600 steps");
        assert_eq!(
            j["correct"].as_u64().unwrap(),
            (acc * 10000.0).round() as u64
        );
        if stats == "population" {
            assert_eq!(j["population_batches"], 1000);
        }
    }
}

#[test]
fn divergence_stops_with_a_message_and_keeps_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    common::synthetic_mnist(&data, 120, 20);
    let d = data.to_str().unwrap();
    let out = tmp.path().join("run");
    let o = bnlab(&[
        "train",
        "--model",
        "mlp-fig1",
        "--data",
        d,
        "--steps",
        "500",
        "--lr",
        "1e38",
        "--eval-every",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("diverged at step"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("latest.safetensors"), "{err}");
    // Checkpointed after step 1, before the loss became NaN: it loads, so it was written whole
    // and holds finite values.
    let good = out.join("latest.safetensors");
    let o = bnlab(&[
        "eval",
        "--model",
        "mlp-fig1",
        "--weights",
        good.to_str().unwrap(),
        "--data",
        d,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn bench_prints_steps_per_second_as_json() {
    let d = tempfile::tempdir().unwrap();
    common::synthetic_mnist(d.path(), 120, 20);
    let o = bnlab(&[
        "bench",
        "--model",
        "mlp-fig1-bn",
        "--data",
        d.path().to_str().unwrap(),
        "--steps",
        "200",
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
    assert!(j["steps_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn reproduce_writes_the_whole_report() {
    let Some(d) = common::mnist_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("fig1");
    let o = bnlab(&[
        "reproduce",
        "mnist",
        "--data",
        d.to_str().unwrap(),
        "--steps",
        "1000",
        "--eval-every",
        "250",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    for f in [
        "metrics.csv",
        "results.json",
        "summary.md",
        "fig1.svg",
        "fig1.png",
    ] {
        assert!(Path::new(&out.join(f)).exists(), "{f} missing");
    }
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    for v in ["mlp-fig1", "mlp-fig1-bn"] {
        let curve = j["variants"][v]["curve"].as_array().unwrap();
        assert_eq!(curve.len(), 5, "{v}: evaluations at 0, 250, 500, 750, 1000");
        let last = &curve[4];
        assert_eq!(last["step"], 1000);
        assert!(last["p15"].as_f64().unwrap() <= last["p50"].as_f64().unwrap());
        assert!(last["p50"].as_f64().unwrap() <= last["p85"].as_f64().unwrap());
        let acc = last["test_accuracy"].as_f64().unwrap();
        assert!(acc > 0.5, "{v}: {acc} after 1000 steps");
        assert!(j["variants"][v]["final"]["population"].as_f64().unwrap() > 0.5);
    }
    assert_eq!(j["setup"]["steps"], 1000);
}

/// An unusable output directory is refused before the long training, not after it: no run
/// finishes (no "at step" line) before the error.
#[test]
fn reproduce_refuses_an_unusable_output_directory_first() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let out = file.join("out");
    let o = out.to_str().unwrap();
    let r = bnlab(&["reproduce", "inception", "--quick", "--out", o]);
    let err = stderr(&r);
    assert!(!r.status.success(), "reproduce inception succeeded: {err}");
    assert!(err.contains("a-file"), "the path is named: {err}");
    assert!(!err.contains("at step"), "training ran first: {err}");
    assert!(!err.contains("panicked"), "{err}");
}
