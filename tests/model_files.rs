//! Networks as data: model files parse and build with errors that name the place, the presets
//! are files (`bnlab models`, `models show`), `bnlab summary` counts parameters as PyTorch does,
//! `bnlab grad` writes every parameter's gradient, and a user-written ResNet variant trains,
//! folds and exports from the command line (onnxruntime agreeing with bnlab when
//! `$BNLAB_ONNX_PYTHON` is set).

mod common;

use common::{fails_with, ok};

use bnlab::checkpoint::{self, Loaded, TensorFile};
use bnlab::data::Split;
use bnlab::model::{self, ModelSpec};
use bnlab::network::Network;
use bnlab::nn::Mode;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn fashion_dir() -> Option<PathBuf> {
    common::fashion_or_skip()
}

fn fashion() -> Option<&'static Split> {
    static DATA: OnceLock<Option<Split>> = OnceLock::new();
    DATA.get_or_init(|| {
        common::fashion_dir()
            .map(|d| bnlab::data::fashion_mnist(Some(&d)).expect("Fashion-MNIST loads"))
    })
    .as_ref()
}

/// Parse and build `text` for a 1x28x28 input; the error message if either fails.
fn build_error(text: &str) -> String {
    match ModelSpec::parse(text, "t.json") {
        Err(e) => e.to_string(),
        Ok(spec) => {
            let input = match model::resolve_input(&spec, Some(&[1, 28, 28])) {
                Ok(i) => i,
                Err(e) => return e.to_string(),
            };
            match model::build(&spec, &input, 0, false) {
                Ok(_) => panic!("expected an error for {text}"),
                Err(e) => e.to_string(),
            }
        }
    }
}

fn wrap(layers: &str) -> String {
    format!(r#"{{"name": "t", "input": [1, 28, 28], "layers": [{layers}]}}"#)
}

#[test]
fn every_inconsistency_is_an_error_naming_its_place() {
    let cases: &[(&str, &[&str])] = &[
        ("{not json", &["not valid JSON", "line 1"]),
        (r#"{"layers": []}"#, &["needs 'input'"]),
        (
            &wrap(r#"{"type": "Conv2d", "out_channels": 4, "kernal_size": 3}"#),
            &[
                "layers[0]",
                "unknown key 'kernal_size' for Conv2d",
                "kernel_size",
            ],
        ),
        (
            &wrap(r#"{"type": "Conv3d", "out_channels": 4}"#),
            &["layers[0]", "unknown layer type 'Conv3d'", "Residual"],
        ),
        (
            &wrap(
                r#"{"name": "stem", "type": "Conv2d", "in_channels": 3, "out_channels": 4, "kernel_size": 3}, {"type": "GlobalAvgPool"}, {"type": "Linear", "out_features": 10}"#,
            ),
            &[
                "module 'stem'",
                "in_channels is 3 but the input has 1 channels",
            ],
        ),
        (
            &wrap(
                r#"{"type": "MaxPool2d", "kernel_size": 8}, {"type": "MaxPool2d", "kernel_size": 8}, {"type": "GlobalAvgPool"}, {"type": "Linear", "out_features": 10}"#,
            ),
            &["layers[1] (module '1')", "3x3 map pools to nothing"],
        ),
        (
            &wrap(r#"{"type": "Linear", "out_features": 10}"#),
            &["layers[0]", "Linear needs a flat input", "Flatten"],
        ),
        (
            &wrap(
                r#"{"name": "block", "type": "Residual", "layers": [{"name": "conv1", "type": "Conv2d", "out_channels": 8, "kernel_size": 3, "stride": 2, "padding": 1}], "shortcut": {"name": "downsample", "type": "Conv2d", "out_channels": 8, "kernel_size": 1}}, {"type": "GlobalAvgPool"}, {"type": "Linear", "out_features": 10}"#,
            ),
            &[
                "layers[0].shortcut (module 'block')",
                "shortcut gives [8, 28, 28]",
                "main branch gives [8, 14, 14]",
            ],
        ),
        (
            &wrap(
                r#"{"type": "Residual", "layers": [{"name": "conv1", "type": "Conv2d", "out_channels": 8, "kernel_size": 3, "padding": 1}]}"#,
            ),
            &["identity shortcut keeps [1, 28, 28]", "projection shortcut"],
        ),
        (
            &wrap(
                r#"{"name": "a", "type": "Concat", "branches": [{"name": "b1", "type": "Conv2d", "out_channels": 4, "kernel_size": 1}, {"name": "b2", "type": "MaxPool2d", "kernel_size": 2}]}"#,
            ),
            &["layers[0].branches[1]", "cannot be joined on channels"],
        ),
        (
            &wrap(r#"{"name": "a.b", "type": "ReLU"}"#),
            &["module name 'a.b' contains a dot"],
        ),
        (
            &wrap(r#"{"name": "x", "type": "ReLU"}, {"name": "x", "type": "ReLU"}"#),
            &["layers[1]", "'x' used twice"],
        ),
        (
            &wrap(r#"{"type": "Conv2d", "out_channels": 4, "kernel_size": 30}"#),
            &["kernel 30 does not fit the 28x28 input"],
        ),
        (
            &wrap(r#"{"type": "GlobalAvgPool"}"#),
            &["network has 1 output(s)"],
        ),
        (
            &wrap(r#"{"type": "BatchNorm1d"}"#),
            &["BatchNorm1d needs a flat input"],
        ),
        (
            r#"{"input": [784], "init": {"Linear": {"weight": {"normal": -1}}}, "layers": [{"type": "Linear", "out_features": 10}]}"#,
            &["init.Linear", "STD > 0"],
        ),
        (
            &wrap(r#"{"type": "Dropout", "p": 1.5}"#),
            &["'p' must be in [0, 1)"],
        ),
    ];
    for (text, needles) in cases {
        let e = build_error(text);
        for n in *needles {
            assert!(e.contains(n), "expected '{n}' in: {e}\n(file: {text})");
        }
    }
    // The example shape must match the model's input, and the error says both.
    let spec = model::preset("inception-mini-bn").unwrap();
    let e = model::resolve_input(&spec, Some(&[3, 32, 32]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("[3, 32, 32]") && e.contains("[1, 28, 28]"),
        "{e}"
    );
    let e = model::resolve_input(&model::preset("resnet20-bn").unwrap(), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("comes from the data"), "{e}");
}

#[test]
fn a_bad_model_file_is_a_clear_cli_error() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.json");
    std::fs::write(
        &bad,
        wrap(r#"{"type": "Conv2d", "out_channels": 4, "kernel_size": 3, "paddin": 1}"#),
    )
    .unwrap();
    let b = bad.to_str().unwrap();
    fails_with(
        &["summary", "--model", b],
        &["bad.json", "unknown key 'paddin'"],
    );
    fails_with(
        &["train", "--model", b, "--steps", "1"],
        &["unknown key 'paddin'"],
    );
    fails_with(
        &["summary", "--model", "no-such-net"],
        &["neither a preset"],
    );
    fails_with(
        &["models", "show", "resnet21"],
        &["'resnet21' is not a preset"],
    );
}

#[test]
fn presets_are_files_listed_and_shown() {
    let list = ok(&["models"]);
    for name in model::preset_names() {
        assert!(list.contains(name), "{name} missing from:\n{list}");
    }
    // Parameter counts as PyTorch's numel sums: inception-mini-bn (../shared/peers) and the
    // MLPs: 784*100 + 2*100*100 + 100*10 weights, the output layer's 10 biases, and 3 x
    // (gamma, beta) of 100 with BN or 3 x 100 hidden biases without.
    let line = |n: &str| {
        list.lines()
            .find(|l| l.split_whitespace().next() == Some(n))
            .unwrap_or_else(|| panic!("no line for {n}"))
            .to_string()
    };
    assert!(
        line("mlp-fig1-bn").contains("100,010"),
        "{}",
        line("mlp-fig1-bn")
    );
    assert!(line("mlp-fig1").contains("99,710"), "{}", line("mlp-fig1"));
    assert!(line("resnet20-bn").contains("from the data"));
    for name in model::preset_names() {
        let shown = ok(&["models", "show", name]);
        let spec = ModelSpec::parse(&shown, name).unwrap();
        assert_eq!(spec, model::preset(name).unwrap(), "{name}");
        // The embedded file is the one kept readable in models/.
        let on_disk = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("models/{name}.json")),
        )
        .unwrap();
        assert_eq!(shown, on_disk, "{name}");
    }
}

/// The parameter count of resnet20-bn equals the number of values PyTorch's gradient case
/// holds (one gradient per parameter), when ../shared is present.
#[test]
fn summary_counts_parameters_as_pytorch() {
    let Some(fashion) = fashion_dir() else { return };
    let out = ok(&[
        "summary",
        "--model",
        "resnet20-bn",
        "--data",
        fashion.to_str().unwrap(),
    ]);
    assert!(out.contains("layer2.0.downsample"), "{out}");
    assert!(out.contains("[64, 7, 7]"), "{out}");
    let total: usize = out
        .lines()
        .find_map(|l| l.strip_prefix("total parameters: "))
        .expect("a total line")
        .replace(',', "")
        .parse()
        .unwrap();
    let Some(reference) = common::shared_reference_dir() else {
        common::skip("../shared/reference absent; parameter count not compared with PyTorch");
        return;
    };
    let grads =
        TensorFile::read(&reference.join("grad/resnet20_bn_grad.grad.safetensors")).unwrap();
    let torch: usize = grads
        .tensors
        .iter()
        .filter(|(k, _)| *k != "loss")
        .map(|(_, (shape, _))| shape.iter().product::<usize>())
        .sum();
    assert_eq!(total, torch, "bnlab counts {total}, PyTorch has {torch}");
    println!("resnet20-bn on 1x28x28: {total} parameters, as PyTorch");
}

#[test]
fn grad_writes_every_parameter_and_refuses_odd_batches() {
    let Some(fashion) = fashion_dir() else { return };
    let f = fashion.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("w.safetensors");
    let mut net = Network::preset("inception-mini-bn", 3, 8, 1).unwrap();
    checkpoint::save(&mut net, &w).unwrap();
    let w = w.to_str().unwrap();
    let g = tmp.path().join("g.safetensors");
    let gs = g.to_str().unwrap();
    let out = ok(&[
        "grad",
        "--model",
        "inception-mini-bn",
        "--weights",
        w,
        "--data",
        f,
        "--batch-size",
        "8",
        "--offset",
        "100",
        "--save",
        gs,
        "--json",
    ]);
    let last: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["tensors"], 47);
    let file = TensorFile::read(&g).unwrap();
    assert_eq!(file.tensors.len(), 48, "47 gradients and the loss");
    let Some((_, Loaded::F64(loss))) = file.tensors.get("loss") else {
        panic!("no loss")
    };
    assert!((loss[0] - last["loss"].as_f64().unwrap()).abs() < 1e-12);
    // Nothing else changes: the weights file is untouched, and a second run gives the same.
    let out2 = ok(&[
        "grad",
        "--model",
        "inception-mini-bn",
        "--weights",
        w,
        "--data",
        f,
        "--batch-size",
        "8",
        "--offset",
        "100",
        "--save",
        gs,
        "--json",
    ]);
    assert_eq!(out.lines().last(), out2.lines().last());
    fails_with(
        &[
            "grad",
            "--model",
            "inception-mini-bn",
            "--weights",
            w,
            "--data",
            f,
            "--batch-size",
            "8",
            "--offset",
            "59995",
            "--save",
            gs,
        ],
        &["--offset", "60000 examples"],
    );
    fails_with(
        &[
            "grad",
            "--model",
            "inception-mini-bn",
            "--weights",
            w,
            "--data",
            f,
            "--batch-size",
            "8",
            "--save",
            "/nonexistent-dir/g.safetensors",
        ],
        &["/nonexistent-dir", "does not exist"],
    );
}

/// A user-written ResNet (depth 14, widths 8/16/32, models/examples) trains, folds and exports
/// from the command line; the folded network computes what the BN network does, and
/// onnxruntime agrees with bnlab.
#[test]
fn a_user_written_resnet_trains_folds_and_exports() {
    let Some(dir) = fashion_dir() else { return };
    let data = fashion().unwrap();
    let f = dir.to_str().unwrap();
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/examples/resnet14-narrow.json");
    let m = file.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let w = tmp.path().join("w.safetensors");
    ok(&[
        "train",
        "--model",
        m,
        "--data",
        f,
        "--steps",
        "40",
        "--batch-size",
        "16",
        "--lr",
        "0.05",
        "--momentum",
        "0.9",
        "--eval-every",
        "0",
        "--save",
        w.to_str().unwrap(),
    ]);
    let folded = tmp.path().join("folded.safetensors");
    ok(&[
        "fold",
        "--model",
        m,
        "--weights",
        w.to_str().unwrap(),
        "--save",
        folded.to_str().unwrap(),
    ]);
    let onnx = tmp.path().join("m.onnx");
    ok(&[
        "export",
        "--model",
        m,
        "--weights",
        w.to_str().unwrap(),
        "--out",
        onnx.to_str().unwrap(),
    ]);
    assert!(std::fs::metadata(&onnx).unwrap().len() > 10_000);

    // The folded checkpoint carries its model file; it computes the BN network's function.
    let spec = model::resolve(m).unwrap();
    let input = model::resolve_input(&spec, Some(&[1, 28, 28])).unwrap();
    let mut bn = Network::build(&spec, &input, 0, 100, 1).unwrap();
    checkpoint::load(&mut bn, &w).unwrap();
    let ffile = TensorFile::read(&folded).unwrap();
    let fspec = ModelSpec::parse(&ffile.metadata[checkpoint::MODEL_SPEC_KEY], "folded").unwrap();
    assert_eq!(fspec.name, "resnet14-narrow-folded");
    assert!(!fspec.has_batch_norm());
    let mut plain = Network::build(&fspec, &input, 0, 100, 1).unwrap();
    checkpoint::load(&mut plain, &folded).unwrap();
    let n = 100;
    let mut x = vec![0.0; n * 784];
    let mut y = vec![0; n];
    let idx: Vec<usize> = (0..n).collect();
    data.test.fill_batch(&idx, &mut x, &mut y);
    let a = bn.forward(&x, n, Mode::Eval).unwrap().to_vec();
    let b = plain.forward(&x, n, Mode::Eval).unwrap().to_vec();
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs())).max(1.0);
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (p, q)| m.max((p - q).abs()));
    assert!(worst <= 1e-4 * scale, "folded logits differ by {worst}");

    let Some(python) = common::onnx_python_or_skip() else {
        return;
    };
    let preds = bnlab::train::predictions(&mut bn, &data.test).unwrap();
    let text: String = preds[..2000].iter().map(|p| format!("{p}\n")).collect();
    let pp = tmp.path().join("preds.txt");
    std::fs::write(&pp, text).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx_check.py");
    let o = Command::new(python)
        .arg(&script)
        .arg(&onnx)
        .arg(&dir)
        .arg(&pp)
        .args(["--limit", "2000"])
        .output()
        .unwrap();
    let so = String::from_utf8_lossy(&o.stdout);
    println!("resnet14-narrow onnxruntime: {}", so.trim());
    assert!(
        o.status.success(),
        "onnx_check failed: {so}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
