//! Data sets of the user's own on the command line: CIFAR-10's binary format and NumPy `.npz`
//! train the presets whose input matches them (with `--normalize` and `--augment`), a shape
//! mismatch is an error naming both shapes, the normalization travels in the checkpoint to
//! `eval`, and two identical runs write identical checkpoint bytes.

mod common;

use common::{bnlab, fails_with, ok};

use bnlab::checkpoint::{self, TensorFile};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Pseudo-random bytes from a seed.
fn bytes(n: usize, mut s: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// A small CIFAR-10 binary set: five training files of 16 records and a test file of 16, the
/// label of each record its index mod 10 and the pixels brighter for higher labels, so that
/// there is something to learn.
fn cifar_dir(root: &Path) -> PathBuf {
    let dir = root.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let names = [
        "data_batch_1.bin",
        "data_batch_2.bin",
        "data_batch_3.bin",
        "data_batch_4.bin",
        "data_batch_5.bin",
        "test_batch.bin",
    ];
    for (k, name) in names.iter().enumerate() {
        let mut out = Vec::new();
        for r in 0..16u64 {
            let label = (r % 10) as u8;
            out.push(label);
            let noise = bytes(3072, 1 + k as u64 * 100 + r);
            out.extend(noise.iter().map(|&b| b / 4 + label * 19));
        }
        std::fs::write(dir.join(name), out).unwrap();
    }
    root.to_path_buf()
}

/// A grey 28x28 `.npz` in Keras's mnist.npz layout (uint8 images, uint8 labels).
fn npz_file(root: &Path) -> PathBuf {
    let (n_train, n_test) = (64, 32);
    let labels = |n: usize| -> Vec<u8> { (0..n).map(|i| (i % 10) as u8).collect() };
    let images = |n: usize, seed: u64| -> Vec<u8> {
        let mut v = bytes(n * 784, seed);
        for (i, px) in v.iter_mut().enumerate() {
            *px = (*px / 4).saturating_add(((i / 784) % 10) as u8 * 20);
        }
        v
    };
    let members = vec![
        (
            "x_train.npy",
            common::npy("|u1", &[n_train, 28, 28], &images(n_train, 3)),
        ),
        (
            "y_train.npy",
            common::npy("|u1", &[n_train], &labels(n_train)),
        ),
        (
            "x_test.npy",
            common::npy("|u1", &[n_test, 28, 28], &images(n_test, 4)),
        ),
        ("y_test.npy", common::npy("|u1", &[n_test], &labels(n_test))),
    ];
    let path = root.join("mine.npz");
    std::fs::write(&path, common::zip_of(&members, true)).unwrap();
    path
}

#[test]
fn cifar_format_trains_resnet20_with_normalization_and_augmentation() {
    let tmp = tempfile::tempdir().unwrap();
    let root = cifar_dir(&tmp.path().join("cifar"));
    let d = root.to_str().unwrap();
    let w = tmp.path().join("r20.safetensors");
    let summary = ok(&["summary", "--model", "resnet20-bn", "--data", d]);
    assert!(
        summary.contains("resnet20-bn (input [3, 32, 32])"),
        "{summary}"
    );
    ok(&[
        "train",
        "--model",
        "resnet20-bn",
        "--data",
        d,
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--normalize",
        "auto",
        "--augment",
        "crop-flip",
        "--eval-every",
        "0",
        "--save",
        w.to_str().unwrap(),
    ]);
    let file = TensorFile::read(&w).unwrap();
    assert_eq!(
        checkpoint::recorded_input_shape(&file),
        Some(vec![3, 32, 32])
    );
    let norm: bnlab::data::Normalization =
        serde_json::from_str(&file.metadata[checkpoint::NORMALIZE_KEY]).unwrap();
    assert_eq!(norm.mean.len(), 3, "one mean per channel: {norm:?}");
    let out = ok(&[
        "eval",
        "--model",
        "resnet20-bn",
        "--weights",
        w.to_str().unwrap(),
        "--data",
        d,
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(j["total"], 16);
    // Export needs no data: the input shape comes from the checkpoint.
    let onnx = tmp.path().join("r20.onnx");
    ok(&[
        "export",
        "--model",
        "resnet20-bn",
        "--weights",
        w.to_str().unwrap(),
        "--out",
        onnx.to_str().unwrap(),
    ]);
    // A network whose input does not match gets both shapes.
    fails_with(
        &[
            "train",
            "--model",
            "inception-mini-bn",
            "--data",
            d,
            "--steps",
            "1",
        ],
        &["[3, 32, 32]", "[1, 28, 28]"],
    );
    fails_with(
        &[
            "eval",
            "--model",
            "mlp-fig1",
            "--weights",
            w.to_str().unwrap(),
            "--data",
            d,
        ],
        &["[3, 32, 32]", "[784]"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "resnet20-bn",
            "--data",
            d,
            "--normalize",
            "0.5,0",
        ],
        &["--normalize"],
    );
    fails_with(
        &[
            "train",
            "--model",
            "resnet20-bn",
            "--data",
            d,
            "--augment",
            "rotate",
        ],
        &["--augment", "crop-flip"],
    );
}

#[test]
fn npz_trains_the_mlp_and_two_identical_runs_write_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let npz = npz_file(tmp.path());
    let d = npz.to_str().unwrap();
    let mut files = Vec::new();
    for k in 0..2 {
        let w = tmp.path().join(format!("mlp{k}.safetensors"));
        ok(&[
            "train",
            "--model",
            "mlp-fig1-bn",
            "--data",
            d,
            "--steps",
            "30",
            "--batch-size",
            "16",
            "--normalize",
            "0.2,0.3",
            "--eval-every",
            "0",
            "--save",
            w.to_str().unwrap(),
        ]);
        files.push(std::fs::read(&w).unwrap());
    }
    assert!(
        files[0] == files[1],
        "two identical runs wrote different bytes"
    );
    let w = tmp.path().join("mlp0.safetensors");
    let out = ok(&[
        "eval",
        "--model",
        "mlp-fig1-bn",
        "--weights",
        w.to_str().unwrap(),
        "--data",
        d,
        "--json",
    ]);
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(j["total"], 32);
    assert!(j["accuracy"].as_f64().unwrap() > 0.2, "{j}");
    // The convolutional presets take 1x28x28 too.
    ok(&[
        "train",
        "--model",
        "inception-mini-bn",
        "--data",
        d,
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--eval-every",
        "0",
    ]);
    // The ResNets take any image: the same preset builds for 1x28x28.
    let summary = ok(&["summary", "--model", "resnet20-bn", "--data", d]);
    assert!(summary.contains("(input [1, 28, 28])"), "{summary}");
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1",
            "--data",
            tmp.path().join("nope.npz").to_str().unwrap(),
        ],
        &["nope.npz"],
    );
}

/// Odd input gets a clear answer: a batch larger than the training set, more threads than
/// the kernels use, Algorithm 2 on a training set smaller than one of its batches; the
/// training batch size travels in the checkpoint and is Algorithm 2's default.
#[test]
fn odd_sizes_get_clear_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let npz = npz_file(tmp.path());
    let d = npz.to_str().unwrap();
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1-bn",
            "--data",
            d,
            "--batch-size",
            "65",
        ],
        &[
            "--batch-size",
            "65 is larger than the training set (64 examples)",
        ],
    );
    fails_with(
        &[
            "bench",
            "--model",
            "mlp-fig1-bn",
            "--data",
            d,
            "--batch-size",
            "100",
        ],
        &["--batch-size", "larger than the training set"],
    );
    let w = tmp.path().join("w.safetensors");
    let o = bnlab(&[
        "train",
        "--model",
        "mlp-fig1-bn",
        "--data",
        d,
        "--steps",
        "5",
        "--batch-size",
        "16",
        "--threads",
        "300",
        "--eval-every",
        "0",
        "--save",
        w.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--threads 300") && err.contains("running on 256"),
        "{err}"
    );
    let file = TensorFile::read(&w).unwrap();
    assert_eq!(file.metadata[checkpoint::BATCH_SIZE_KEY], "16");
    // Algorithm 2 uses the recorded batch size (64 / 16 = 4 batches), and says so.
    let o = bnlab(&[
        "eval",
        "--model",
        "mlp-fig1-bn",
        "--weights",
        w.to_str().unwrap(),
        "--data",
        d,
        "--bn-stats",
        "population",
        "--json",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("mini-batches of 16 (the training batch size recorded"),
        "{err}"
    );
    let out = String::from_utf8_lossy(&o.stdout);
    let j: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(j["population_batches"], 4);
    // A population batch larger than the training set is refused, not replaced by the
    // running averages.
    fails_with(
        &[
            "eval",
            "--model",
            "mlp-fig1-bn",
            "--weights",
            w.to_str().unwrap(),
            "--data",
            d,
            "--bn-stats",
            "population",
            "--population-batch-size",
            "100",
        ],
        &["Algorithm 2 needs at least one mini-batch of 100", "has 64"],
    );
}

/// Output paths are checked before any work, and a missing directory is refused (naming the
/// path given) rather than created; a run started with a relative `--data` resumes from any
/// directory.
#[test]
fn output_paths_and_relative_data() {
    let tmp = tempfile::tempdir().unwrap();
    let npz = npz_file(tmp.path());
    let d = npz.to_str().unwrap();
    let missing = tmp.path().join("no-such-dir/w.safetensors");
    fails_with(
        &[
            "train",
            "--model",
            "mlp-fig1",
            "--data",
            d,
            "--steps",
            "3",
            "--save",
            missing.to_str().unwrap(),
        ],
        &["no-such-dir/w.safetensors", "does not exist"],
    );
    assert!(
        !tmp.path().join("no-such-dir").exists(),
        "a directory was created"
    );
    let w = tmp.path().join("w.safetensors");
    ok(&[
        "train",
        "--model",
        "mlp-fig1",
        "--data",
        d,
        "--steps",
        "3",
        "--eval-every",
        "0",
        "--save",
        w.to_str().unwrap(),
    ]);
    let out = tmp.path().join("no-such-dir/m.onnx");
    fails_with(
        &[
            "export",
            "--model",
            "mlp-fig1",
            "--weights",
            w.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["no-such-dir/m.onnx", "does not exist"],
    );
    // Relative --data, resumed from another working directory.
    let o = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .current_dir(tmp.path())
        .args([
            "train",
            "--model",
            "mlp-fig1",
            "--data",
            "mine.npz",
            "--steps",
            "4",
            "--eval-every",
            "0",
            "--checkpoint-every",
            "2",
            "--out",
            "run",
        ])
        .env_remove("BNLAB_DATA")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = tmp.path().join("run");
    let o = Command::new(env!("CARGO_BIN_EXE_bnlab"))
        .current_dir("/")
        .args(["train", "--resume", run.to_str().unwrap()])
        .env_remove("BNLAB_DATA")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("at step 4 of 4"), "{err}");
}
