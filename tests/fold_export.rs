//! Folding BN into the Linear before it (`bnlab::fold`) and ONNX export (`bnlab::onnx`).
//!
//! Without data: folding hand-set BN layers (affine and not) gives the same logits; bad
//! structures are refused; the exported protobuf parses back with the expected fields, nodes
//! and initializer values. With MNIST (../shared): a trained BN net and its folded twin agree
//! on the whole test set with running and population statistics, and the folded net round-trips
//! through a `mlp-fig1` checkpoint. With MNIST and `$BNLAB_ONNX_PYTHON` (a Python with
//! onnxruntime and numpy): onnxruntime's predictions on the test set equal bnlab's
//! (`scripts/onnx_check.py`). With Fashion-MNIST (/usr/share/datasets/fashion-mnist): the same
//! for `inception-mini-bn` (20 training steps) and its folded `inception-mini` (logits on the
//! first 1000 test images, checkpoint round trip, onnxruntime on the whole test set), and the
//! logits and round trip for `inception-mini-bn-sigmoid` -> `inception-mini-sigmoid` and
//! `inception-mini-bn-dropout` -> `inception-mini`.

mod common;

use bnlab::checkpoint;
use bnlab::data::{load_mnist_dir, Dataset, Split};
use bnlab::fold::fold;
use bnlab::network::Network;
use bnlab::nn::{BatchNorm, InferenceStats, Layer, Mode};
use bnlab::onnx::{encode_model, export_onnx};
use bnlab::optim::Schedule;
use bnlab::train::{self, Evaluator, Order, TrainConfig, Trainer};
use common::Lcg;
use std::path::PathBuf;
use std::sync::OnceLock;

fn mnist() -> Option<&'static Split> {
    static DATA: OnceLock<Option<Split>> = OnceLock::new();
    DATA.get_or_init(|| common::mnist_dir().map(|d| load_mnist_dir(&d).expect("MNIST loads")))
        .as_ref()
}

/// A network trained for 300 steps (momentum, so gamma and beta move away from 1 and 0).
fn trained(preset: &str, data: &Split) -> Network {
    let cfg = TrainConfig {
        steps: 300,
        batch_size: 60,
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 0.0,
        schedule: Schedule::Constant,
        seed: 1,
        order: Order::Shuffle,
        eval_every: 0,
        threads: 1,
        augment: bnlab::train::Augment::None,
        bn: Default::default(),
    };
    let mut net = Network::preset(preset, 1, 1000, 1).unwrap();
    let mut t = Trainer::new(cfg.clone(), data.train.len(), data.train.features());
    for _ in 0..cfg.steps {
        t.step(&mut net, &data.train).unwrap();
    }
    net
}

/// The inference logits of every example of `data`, row after row.
fn logits(net: &mut Network, data: &Dataset) -> Vec<f32> {
    let batch = net.max_batch();
    let (mut x, mut y) = (vec![0.0; batch * data.features()], vec![0; batch]);
    let mut out = Vec::new();
    let mut start = 0;
    while start < data.len() {
        let n = batch.min(data.len() - start);
        let idx: Vec<usize> = (start..start + n).collect();
        data.fill_batch(&idx, &mut x, &mut y);
        out.extend_from_slice(net.forward(&x, n, Mode::Eval).unwrap());
        start += n;
    }
    out
}

/// max |a - b| / max(1, max |b|).
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(&p, &q)| (p as f64 - q as f64).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|&q| (q as f64).abs()).fold(1.0, f64::max);
    diff / scale
}

/// Give every BN layer non-trivial gamma, beta and running statistics, as training would.
fn randomize_bn(net: &mut Network, rng: &mut Lcg) {
    net.for_each_batch_norm(&mut |bn| {
        let c = bn.c;
        if let Some(g) = &mut bn.gamma {
            *g = rng.vec_f32(c, 0.5, 1.0);
        }
        if let Some(b) = &mut bn.beta {
            *b = rng.vec_f32(c, 0.5, 0.0);
        }
        bn.running_mean = rng.vec_f32(c, 2.0, 0.0);
        bn.running_var = rng.vec_f32(c, 0.9, 1.0);
    });
}

#[test]
fn folding_hand_set_batch_norm_keeps_the_logits() {
    let mut rng = Lcg(0x1234_5678_9abc_def1);
    let n = 50;
    let x = rng.vec_f32(n * 784, 0.5, 0.5);
    for affine in [true, false] {
        let mut net = Network::preset("mlp-fig1-bn", 3, n, 1).unwrap();
        if !affine {
            for l in net.body.layers.iter_mut() {
                if let Some(bn) = l.as_any_mut().downcast_mut::<BatchNorm>() {
                    *bn = BatchNorm::new(bn.c, 1, bn.eps, false);
                }
            }
            net.body.reserve(n);
        }
        randomize_bn(&mut net, &mut rng);
        let want = net.forward(&x, n, Mode::Eval).unwrap().to_vec();
        let mut folded = fold(&mut net).unwrap();
        assert_eq!(folded.name(), "mlp-fig1");
        let got = folded.forward(&x, n, Mode::Eval).unwrap().to_vec();
        let e = rel_diff(&got, &want);
        assert!(e <= 1e-5, "affine {affine}: relative difference {e:.2e}");
    }
}

#[test]
fn folding_refuses_what_it_cannot_fold() {
    let mut plain = Network::preset("mlp-fig1", 1, 10, 1).unwrap();
    let e = fold(&mut plain).err().expect("plain preset").to_string();
    assert!(e.contains("no batch normalization"), "{e}");

    // BN after a sigmoid: nothing to fold it into.
    let mut net = Network::preset("mlp-fig1-bn", 1, 10, 1).unwrap();
    net.body.layers.swap(1, 2);
    let e = fold(&mut net).err().expect("BN after sigmoid").to_string();
    assert!(e.contains("layer 2 (BatchNorm1d"), "{e}");

    // A missing layer: the folded layers no longer match the plain preset.
    let mut net = Network::preset("mlp-fig1-bn", 1, 10, 1).unwrap();
    net.body.layers.remove(2);
    let e = fold(&mut net).err().expect("missing sigmoid").to_string();
    assert!(e.contains("cannot fold mlp-fig1-bn"), "{e}");
}

#[test]
fn folded_network_agrees_with_batch_norm_on_mnist() {
    let Some(data) = mnist() else {
        common::skip("MNIST not present");
        return;
    };
    let mut bn_net = trained("mlp-fig1-bn", data);
    let mut eval = Evaluator::new(1000, 784);
    for stats in [InferenceStats::Running, InferenceStats::Population] {
        if stats == InferenceStats::Population {
            let batches = train::population_statistics(&mut bn_net, &data.train, 60, None).unwrap();
            assert_eq!(batches, 1000);
        }
        let mut folded = fold(&mut bn_net).unwrap();
        let want = logits(&mut bn_net, &data.test);
        let got = logits(&mut folded, &data.test);
        let e = rel_diff(&got, &want);
        let flips = got
            .chunks_exact(10)
            .zip(want.chunks_exact(10))
            .filter(|(a, b)| train::argmax(a) != train::argmax(b))
            .count();
        let ev_bn = eval.evaluate(&mut bn_net, &data.test, None, None).unwrap();
        let ev_folded = eval.evaluate(&mut folded, &data.test, None, None).unwrap();
        println!(
            "{stats:?} statistics: BN {} / {}, folded {} / {}, logits relative difference {e:.2e}, \
             {flips} argmax flips",
            ev_bn.correct, ev_bn.total, ev_folded.correct, ev_folded.total
        );
        assert!(e <= 1e-4, "{stats:?}: logits differ by {e:.2e} (relative)");
        assert_eq!(ev_folded.correct, ev_bn.correct, "{stats:?}: correct count");
        assert!(ev_bn.accuracy() > 0.8, "{stats:?}: the net did not train");

        // The folded net is an ordinary mlp-fig1 network: its checkpoint loads into one.
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("folded.safetensors");
        checkpoint::save(&mut folded, &p).unwrap();
        let mut fresh = Network::preset("mlp-fig1", 99, 1000, 1).unwrap();
        checkpoint::load(&mut fresh, &p).unwrap();
        assert!(
            logits(&mut fresh, &data.test) == got,
            "{stats:?}: reloaded network differs"
        );
    }
}

// ---- ONNX ----

/// A protobuf field value, as far as the test needs to read one.
#[derive(Debug)]
enum Val<'a> {
    Varint(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

fn read_varint(b: &mut &[u8]) -> u64 {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = b.split_first().expect("truncated varint");
        *b = rest;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte < 0x80 {
            return v;
        }
    }
    panic!("varint longer than 10 bytes")
}

/// The fields of one protobuf message, in order (panics on malformed input).
fn fields(mut b: &[u8]) -> Vec<(u64, Val<'_>)> {
    let mut out = Vec::new();
    while !b.is_empty() {
        let key = read_varint(&mut b);
        let val = match key & 7 {
            0 => Val::Varint(read_varint(&mut b)),
            5 => {
                let (v, rest) = b.split_at(4);
                b = rest;
                Val::Fixed32(u32::from_le_bytes(v.try_into().unwrap()))
            }
            2 => {
                let len = read_varint(&mut b) as usize;
                let (v, rest) = b.split_at(len);
                b = rest;
                Val::Bytes(v)
            }
            w => panic!("unexpected wire type {w}"),
        };
        out.push((key >> 3, val));
    }
    out
}

fn bytes_of<'a>(f: &[(u64, Val<'a>)], field: u64) -> Vec<&'a [u8]> {
    f.iter()
        .filter_map(|(k, v)| match v {
            Val::Bytes(b) if *k == field => Some(*b),
            _ => None,
        })
        .collect()
}

fn strings_of(f: &[(u64, Val<'_>)], field: u64) -> Vec<String> {
    bytes_of(f, field)
        .into_iter()
        .map(|b| String::from_utf8(b.to_vec()).unwrap())
        .collect()
}

fn varint_of(f: &[(u64, Val<'_>)], field: u64) -> Option<u64> {
    f.iter().find_map(|(k, v)| match v {
        Val::Varint(x) if *k == field => Some(*x),
        _ => None,
    })
}

/// Name and dims (`None` for the symbolic one, with its name checked to be "N") of a
/// `ValueInfoProto`.
fn value_info(b: &[u8]) -> (String, Vec<Option<u64>>) {
    let f = fields(b);
    let name = strings_of(&f, 1).remove(0);
    let ty = fields(bytes_of(&f, 2)[0]);
    let tensor = fields(bytes_of(&ty, 1)[0]);
    assert_eq!(varint_of(&tensor, 1), Some(1), "{name}: float32");
    let shape = fields(bytes_of(&tensor, 2)[0]);
    let dims = bytes_of(&shape, 1)
        .into_iter()
        .map(|d| {
            let d = fields(d);
            if let Some(v) = varint_of(&d, 1) {
                Some(v)
            } else {
                assert_eq!(strings_of(&d, 2), ["N"]);
                None
            }
        })
        .collect();
    (name, dims)
}

#[test]
fn onnx_file_parses_back_with_the_expected_graph() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Lcg(77);
    for preset in ["mlp-fig1-bn", "mlp-fig1"] {
        let mut net = Network::preset(preset, 5, 10, 1).unwrap();
        randomize_bn(&mut net, &mut rng);
        let path = tmp.path().join(format!("{}.onnx", preset));
        export_onnx(&mut net, &path).unwrap();
        assert!(!tmp.path().join(format!("{}.onnx.tmp", preset)).exists());
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, encode_model(&mut net).unwrap());
        // ir_version 8 comes first: key (1 << 3 | 0) = 0x08, value 8.
        assert_eq!(&bytes[..2], &[0x08, 0x08]);
        for s in ["Gemm", "input", "logits", "bnlab"] {
            assert!(bytes.windows(s.len()).any(|w| w == s.as_bytes()), "{s}");
        }

        let model = fields(&bytes);
        assert_eq!(varint_of(&model, 1), Some(8));
        assert_eq!(strings_of(&model, 2), ["bnlab"]);
        let opsets = bytes_of(&model, 8);
        assert_eq!(opsets.len(), 1);
        let opset = fields(opsets[0]);
        assert_eq!(strings_of(&opset, 1), [""]);
        assert_eq!(varint_of(&opset, 2), Some(17));

        let graph = fields(bytes_of(&model, 7)[0]);
        let nodes: Vec<_> = bytes_of(&graph, 1).into_iter().map(fields).collect();
        let ops: Vec<String> = nodes.iter().map(|n| strings_of(n, 4).remove(0)).collect();
        let want_ops: Vec<&str> = if bnlab::model::preset(preset).unwrap().has_batch_norm() {
            let hidden = ["Gemm", "BatchNormalization", "Sigmoid"];
            hidden.repeat(3).into_iter().chain(["Gemm"]).collect()
        } else {
            ["Gemm", "Sigmoid"]
                .repeat(3)
                .into_iter()
                .chain(["Gemm"])
                .collect()
        };
        assert_eq!(ops, want_ops, "{preset:?}");
        // A chain from "input" to "logits".
        let mut value = "input".to_string();
        for n in &nodes {
            assert_eq!(strings_of(n, 1)[0], value);
            value = strings_of(n, 2).remove(0);
        }
        assert_eq!(value, "logits");
        for (n, op) in nodes.iter().zip(&ops) {
            let attrs: Vec<_> = bytes_of(n, 5).into_iter().map(fields).collect();
            match op.as_str() {
                "Gemm" => {
                    assert_eq!(attrs.len(), 1);
                    assert_eq!(strings_of(&attrs[0], 1), ["transB"]);
                    assert_eq!(varint_of(&attrs[0], 3), Some(1));
                }
                "BatchNormalization" => {
                    assert_eq!(strings_of(&attrs[0], 1), ["epsilon"]);
                    assert!(
                        matches!(attrs[0][1], (2, Val::Fixed32(b)) if f32::from_bits(b) == 1e-5)
                    );
                    assert_eq!(strings_of(n, 1).len(), 5);
                }
                _ => assert!(attrs.is_empty()),
            }
        }

        let (input, in_dims) = value_info(bytes_of(&graph, 11)[0]);
        let (output, out_dims) = value_info(bytes_of(&graph, 12)[0]);
        assert_eq!((input.as_str(), in_dims), ("input", vec![None, Some(784)]));
        assert_eq!(
            (output.as_str(), out_dims),
            ("logits", vec![None, Some(10)])
        );

        // Initializers: PyTorch's [out, in] weights, BN's inference statistics.
        let mut inits = std::collections::BTreeMap::new();
        for t in bytes_of(&graph, 5) {
            let f = fields(t);
            let dims: Vec<u64> = {
                let mut packed = bytes_of(&f, 1)[0];
                let mut d = Vec::new();
                while !packed.is_empty() {
                    d.push(read_varint(&mut packed));
                }
                d
            };
            assert_eq!(varint_of(&f, 2), Some(1), "float32");
            let raw = bytes_of(&f, 9)[0];
            assert_eq!(raw.len() as u64, dims.iter().product::<u64>() * 4);
            let values: Vec<f32> = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            inits.insert(strings_of(&f, 8).remove(0), (dims, values));
        }
        let (dims, w0) = &inits["0.weight"];
        assert_eq!(dims, &[100, 784]);
        let mut want_w0 = Vec::new();
        net.visit_state(&mut |name, _, mut t| {
            if name == "0.weight" {
                want_w0 = t.floats().unwrap().to_vec(); // stored [784, 100]
            }
        });
        assert_eq!(w0[784 + 2], want_w0[2 * 100 + 1], "row 1, column 2");
        if bnlab::model::preset(preset).unwrap().has_batch_norm() {
            assert!(!inits.contains_key("0.bias"));
            let mut stats = Vec::new();
            net.for_each_batch_norm(&mut |bn| {
                let (m, v) = bn.inference_stats();
                stats.push((m.to_vec(), v.to_vec(), bn.gamma.clone().unwrap()));
            });
            assert_eq!(inits["1.input_mean"].1, stats[0].0);
            assert_eq!(inits["4.input_var"].1, stats[1].1);
            assert_eq!(inits["7.weight"].1, stats[2].2);
            assert_eq!(inits.len(), 3 * 5 + 2);
        } else {
            assert_eq!(inits.len(), 8);
        }
    }
}

/// Export `net`, write bnlab's predictions on the test set, and run `scripts/onnx_check.py`.
fn check_with_onnxruntime(python: &str, net: &mut Network, data: &Split, label: &str) {
    let dir = common::mnist_dir().unwrap();
    check_with_onnxruntime_in(python, net, data, &dir, label);
}

/// As `check_with_onnxruntime`, for the test set of `data` read from `dir` by the script.
fn check_with_onnxruntime_in(
    python: &str,
    net: &mut Network,
    data: &Split,
    dir: &std::path::Path,
    label: &str,
) {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model.onnx");
    export_onnx(net, &model).unwrap();
    let preds = train::predictions(net, &data.test).unwrap();
    let text: String = preds.iter().map(|p| format!("{p}\n")).collect();
    let preds_path = tmp.path().join("predictions.txt");
    std::fs::write(&preds_path, text).unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/onnx_check.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&model)
        .arg(dir)
        .arg(&preds_path)
        .output()
        .unwrap_or_else(|e| panic!("{label}: cannot run {python}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{label}: {}", stdout.trim_end());
    assert!(
        out.status.success(),
        "{label}: onnx_check failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn onnxruntime_predicts_as_bnlab() {
    let Some(python) = common::onnx_python_or_skip() else {
        return;
    };
    let Some(data) = mnist() else {
        common::skip("MNIST not present; onnxruntime check");
        return;
    };
    let mut bn_net = trained("mlp-fig1-bn", data);
    check_with_onnxruntime(
        &python,
        &mut bn_net,
        data,
        "mlp-fig1-bn, running statistics",
    );
    train::population_statistics(&mut bn_net, &data.train, 60, None).unwrap();
    check_with_onnxruntime(
        &python,
        &mut bn_net,
        data,
        "mlp-fig1-bn, population statistics",
    );
    let mut folded = fold(&mut bn_net).unwrap();
    check_with_onnxruntime(
        &python,
        &mut folded,
        data,
        "mlp-fig1-bn folded into mlp-fig1",
    );
    let mut plain = trained("mlp-fig1", data);
    check_with_onnxruntime(&python, &mut plain, data, "mlp-fig1");
}

// ---- Convolutional presets (Fashion-MNIST) ----

fn fashion() -> Option<&'static Split> {
    static DATA: OnceLock<Option<Split>> = OnceLock::new();
    DATA.get_or_init(|| {
        common::fashion_dir()
            .map(|d| bnlab::data::fashion_mnist(Some(&d)).expect("Fashion-MNIST loads"))
    })
    .as_ref()
}

/// A BN `inception-mini*` net trained 20 steps (batch 16, lr 0.05), sized for batches of 100.
fn trained_inception(preset: &str, data: &Split) -> Network {
    let cfg = TrainConfig {
        steps: 20,
        batch_size: 16,
        lr: 0.05,
        momentum: 0.0,
        weight_decay: 0.0,
        schedule: Schedule::Constant,
        seed: 1,
        order: Order::Shuffle,
        eval_every: 0,
        threads: 1,
        augment: bnlab::train::Augment::None,
        bn: Default::default(),
    };
    let mut net = Network::preset(preset, 1, 100, 1).unwrap();
    let mut t = Trainer::new(cfg.clone(), data.train.len(), data.train.features());
    for _ in 0..cfg.steps {
        t.step(&mut net, &data.train).unwrap();
    }
    net
}

/// Inference logits of the first `count` examples of `data` and the number classified right.
fn first_logits(net: &mut Network, data: &Dataset, count: usize) -> (Vec<f32>, usize) {
    let batch = net.max_batch();
    let (mut x, mut y) = (vec![0.0; batch * data.features()], vec![0; batch]);
    let (mut out, mut correct) = (Vec::new(), 0);
    let mut start = 0;
    while start < count {
        let n = batch.min(count - start);
        let idx: Vec<usize> = (start..start + n).collect();
        data.fill_batch(&idx, &mut x, &mut y);
        let l = net.forward(&x, n, Mode::Eval).unwrap();
        for (row, &label) in l.chunks_exact(10).zip(&y[..n]) {
            correct += usize::from(train::argmax(row) == label);
        }
        out.extend_from_slice(l);
        start += n;
    }
    (out, correct)
}

#[test]
fn folded_inception_agrees_with_batch_norm_on_fashion_mnist() {
    let mut plain = Network::preset("inception-mini", 1, 2, 1).unwrap();
    let e = fold(&mut plain).err().expect("nothing to fold").to_string();
    assert!(e.contains("no batch normalization to fold"), "{e}");
    let Some(data) = fashion() else {
        common::skip("Fashion-MNIST not present");
        return;
    };
    for (bn_preset, plain_preset) in [
        ("inception-mini-bn", "inception-mini"),
        ("inception-mini-bn-sigmoid", "inception-mini-sigmoid"),
        ("inception-mini-bn-dropout", "inception-mini"),
    ] {
        let mut bn_net = trained_inception(bn_preset, data);
        let mut folded = fold(&mut bn_net).unwrap();
        assert_eq!(folded.name(), plain_preset);
        let (want, c_bn) = first_logits(&mut bn_net, &data.test, 1000);
        let (got, c_folded) = first_logits(&mut folded, &data.test, 1000);
        let e = rel_diff(&got, &want);
        let flips = got
            .chunks_exact(10)
            .zip(want.chunks_exact(10))
            .filter(|(a, b)| train::argmax(a) != train::argmax(b))
            .count();
        println!(
            "{} -> {}: BN {c_bn} / 1000, folded {c_folded} / 1000, \
             logits relative difference {e:.2e}, {flips} argmax flips",
            bn_preset, plain_preset
        );
        assert!(
            e <= 1e-4,
            "{bn_preset:?}: logits differ by {e:.2e} (relative)"
        );
        assert_eq!(c_folded, c_bn, "{bn_preset:?}: correct count");

        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("folded.safetensors");
        checkpoint::save(&mut folded, &p).unwrap();
        let mut fresh = Network::preset(plain_preset, 99, 100, 1).unwrap();
        checkpoint::load(&mut fresh, &p).unwrap();
        assert!(
            first_logits(&mut fresh, &data.test, 1000).0 == got,
            "{bn_preset:?}: reloaded network differs"
        );
    }
}

#[test]
fn conv_onnx_parses_back_with_conv_and_concat_nodes() {
    for preset in [
        "inception-mini-bn",
        "inception-mini",
        "inception-mini-bn-sigmoid",
        "inception-mini-sigmoid",
        "inception-mini-bn-dropout",
    ] {
        let sigmoid = matches!(
            preset,
            "inception-mini-bn-sigmoid" | "inception-mini-sigmoid"
        );
        let dropout = matches!(
            preset,
            "inception-mini" | "inception-mini-sigmoid" | "inception-mini-bn-dropout"
        );
        let mut net = Network::preset(preset, 5, 2, 1).unwrap();
        let bytes = encode_model(&mut net).unwrap();
        let model = fields(&bytes);
        let graph = fields(bytes_of(&model, 7)[0]);
        let nodes: Vec<_> = bytes_of(&graph, 1).into_iter().map(fields).collect();
        let ops: Vec<String> = nodes.iter().map(|n| strings_of(n, 4).remove(0)).collect();
        let count = |op: &str| ops.iter().filter(|o| *o == op).count();
        // stem + 2 blocks of 7 convolutions.
        assert_eq!(count("Conv"), 15, "{preset:?}: {ops:?}");
        assert_eq!(count("Concat"), 2);
        assert_eq!(count("MaxPool"), 2);
        assert_eq!(count("AveragePool"), 2);
        assert_eq!(count("GlobalAveragePool"), 1);
        assert_eq!(count("Flatten"), 1);
        assert_eq!(count("Gemm"), 1);
        let (act, other) = if sigmoid {
            ("Sigmoid", "Relu")
        } else {
            ("Relu", "Sigmoid")
        };
        assert_eq!(count(act), 15, "{preset:?}");
        assert_eq!(count(other), 0, "{preset:?}");
        let bn = if bnlab::model::preset(preset).unwrap().has_batch_norm() {
            15
        } else {
            0
        };
        assert_eq!(count("BatchNormalization"), bn);
        assert_eq!(count("Identity"), usize::from(dropout), "{preset:?}");
        assert_eq!(ops.len(), 15 * 2 + bn + 2 + 2 + 2 + 3 + count("Identity"));
        // Every input is the graph input, an initializer or an earlier node's output.
        let mut known: std::collections::HashSet<String> = bytes_of(&graph, 5)
            .into_iter()
            .map(|t| strings_of(&fields(t), 8).remove(0))
            .collect();
        known.insert("input".into());
        for n in &nodes {
            for i in strings_of(n, 1) {
                assert!(known.contains(&i), "{preset:?}: {i} used before defined");
            }
            let o = strings_of(n, 2).remove(0);
            assert!(known.insert(o.clone()), "{preset:?}: {o} defined twice");
        }
        assert!(known.contains("logits"));
        // Concat takes the four branches; Conv carries its attributes.
        for (n, op) in nodes.iter().zip(&ops) {
            let attrs: Vec<String> = bytes_of(n, 5)
                .into_iter()
                .map(|a| strings_of(&fields(a), 1).remove(0))
                .collect();
            match op.as_str() {
                "Concat" => {
                    assert_eq!(strings_of(n, 1).len(), 4);
                    assert_eq!(attrs, ["axis"]);
                }
                "Conv" => {
                    assert_eq!(attrs, ["kernel_shape", "strides", "pads"]);
                    let bias = !bnlab::model::preset(preset).unwrap().has_batch_norm();
                    assert_eq!(strings_of(n, 1).len(), 2 + usize::from(bias));
                }
                "AveragePool" => assert!(attrs.contains(&"count_include_pad".to_string())),
                _ => {}
            }
        }
        let (_, in_dims) = value_info(bytes_of(&graph, 11)[0]);
        assert_eq!(in_dims, vec![None, Some(1), Some(28), Some(28)]);
        // Initializers carry the state_dict names.
        let mut names = Vec::new();
        net.visit_state(&mut |name, _, _| names.push(name.to_string()));
        let inits: Vec<String> = bytes_of(&graph, 5)
            .into_iter()
            .map(|t| strings_of(&fields(t), 8).remove(0))
            .collect();
        for want in [
            "stem.conv.weight",
            "a.b4.conv.weight",
            "b.b3.2.conv.weight",
            "fc.weight",
        ] {
            assert!(inits.contains(&want.to_string()), "{preset:?}: {want}");
        }
        for i in &inits {
            // BN's inference statistics are exported as input_mean / input_var.
            let i = i
                .replace("input_mean", "running_mean")
                .replace("input_var", "running_var");
            assert!(
                names.contains(&i),
                "{preset:?}: initializer {i} not in the state_dict"
            );
        }
    }
}

#[test]
fn onnxruntime_predicts_as_bnlab_on_inception() {
    let Some(python) = common::onnx_python_or_skip() else {
        return;
    };
    let Some(data) = fashion() else {
        common::skip("Fashion-MNIST not present; onnxruntime check");
        return;
    };
    let dir = &common::fashion_dir().expect("Fashion-MNIST");
    let mut bn_net = trained_inception("inception-mini-bn", data);
    check_with_onnxruntime_in(&python, &mut bn_net, data, dir, "inception-mini-bn");
    let mut folded = fold(&mut bn_net).unwrap();
    check_with_onnxruntime_in(
        &python,
        &mut folded,
        data,
        dir,
        "inception-mini-bn folded into inception-mini",
    );
}
