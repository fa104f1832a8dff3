//! Whole-network gradients against PyTorch in float64, from the cases the project carries
//! (`tests/data/reference/grad`: presets on a synthetic batch stored with the case; always run)
//! and from `../shared/reference/grad` (`$BNLAB_REFERENCE_DIR/grad`; skipped when absent). See
//! tests/data/reference/README.md: for every `gradient` case, the loss and the gradient of
//! every parameter for one training mini-batch must be within the case's relative-L2
//! tolerance, tensor by tensor, with the same names; for every `eval` case, the PyTorch-trained
//! checkpoint must classify within 2 of PyTorch's count of test images. One line per case is
//! printed (worst tensor, error, tolerance). A case with `norm` runs the preset with `--norm`
//! applied (`gn:4`: every BatchNorm2d a GroupNorm under the same name). With `BNLAB_REQUIRE_DATA=1` (CI) missing data
//! fails instead of skipping.

mod common;

use bnlab::checkpoint::{self, Loaded, TensorFile};
use bnlab::data::{load_mnist_dir, Dataset, Pixels, Split};
use bnlab::model;
use bnlab::network::Network;
use bnlab::nn::ConvAlgo;
use bnlab::train::{gradients, Evaluator};
use common::skip;
use std::path::{Path, PathBuf};
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

fn shared_grad_dir() -> Option<PathBuf> {
    let dir = common::shared_reference_dir()?.join("grad");
    dir.join("cases.json").is_file().then_some(dir)
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

fn floats(file: &TensorFile, name: &str) -> Vec<f64> {
    match file.tensors.get(name) {
        Some((_, Loaded::F64(v))) => v.clone(),
        Some((_, Loaded::F32(v))) => v.iter().map(|&x| x as f64).collect(),
        _ => panic!("reference tensor '{name}' missing or not float"),
    }
}

fn network(
    model_name: &str,
    norm: Option<&str>,
    data: &Dataset,
    max_batch: usize,
    algo: ConvAlgo,
) -> Network {
    let mut spec = model::preset(model_name).expect("preset");
    if let Some(norm) = norm {
        // `--norm`: e.g. resnet20-bn with every BatchNorm2d a GroupNorm(4, C), same names.
        let choice = model::NormChoice::parse(norm).expect("the case's --norm");
        spec = model::apply_norm(&spec, choice).expect("--norm applies");
    }
    let input = model::resolve_input(&spec, Some(&[data.channels, data.rows, data.cols]))
        .expect("input shape");
    let mut net = Network::build(&spec, &input, 0, max_batch, 1).expect("network builds");
    net.set_conv_algo(algo);
    net
}

/// The batch of a `synthetic` case: `x` (F32, N x C x H x W, used as it is) and `labels` (I64).
fn synthetic_batch(path: &Path) -> Dataset {
    let f = TensorFile::read(path).unwrap_or_else(|e| panic!("{e}"));
    let shape = f.shape("x").expect("x").to_vec();
    assert_eq!(shape.len(), 4, "{}: x has shape {shape:?}", path.display());
    let labels = match f.tensors.get("labels") {
        Some((_, Loaded::I64(v))) => v.iter().map(|&l| l as u8).collect(),
        _ => panic!("{}: labels missing or not I64", path.display()),
    };
    let x = f.f32s("x").expect("x is F32");
    Dataset::new(Pixels::F32(x), labels, [shape[1], shape[2], shape[3]], 10).expect("batch")
}

/// Sets every parameter that `spec` names (`{"name": {"seed", "scale", "offset"}}`) to
/// `common::Lcg(seed).vec_f32(numel, scale, offset)` in PyTorch's row-major layout, through a
/// checkpoint, as the cases' script does.
fn xorshift_init(net: &mut Network, spec: &serde_json::Map<String, serde_json::Value>) {
    let mut entries = checkpoint::state_entries(net);
    let mut set = 0;
    for (name, _, shape, bytes) in entries.iter_mut() {
        let Some(s) = spec.get(name.as_str()) else {
            continue;
        };
        let n: usize = shape.iter().product();
        assert_eq!(bytes.len(), 4 * n, "{name} is not a float tensor");
        let values = common::Lcg(s["seed"].as_u64().expect("seed")).vec_f32(
            n,
            s["scale"].as_f64().expect("scale"),
            s["offset"].as_f64().expect("offset"),
        );
        *bytes = checkpoint::f32_bytes(&values);
        set += 1;
    }
    assert_eq!(
        set,
        spec.len(),
        "init_xorshift names tensors the network lacks"
    );
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("init.safetensors");
    checkpoint::write_entries(&path, &entries, checkpoint::model_metadata(net)).unwrap();
    checkpoint::load(net, &path).expect("generated init loads");
}

/// Runs every case of `dir/cases.json` with the convolutions on `algo`; returns how many ran.
fn run_cases(dir: &Path, algo: ConvAlgo) -> usize {
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    let mut passed = 0;
    for (name, case) in cases.as_object().expect("cases.json is an object") {
        let get = |k: &str| case.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let synthetic;
        let (train, split) = match get("data") {
            "synthetic" => {
                synthetic = synthetic_batch(&dir.join(get("batch")));
                (Some(&synthetic), None)
            }
            "mnist" | "fashion-mnist" => {
                let split = if get("data") == "mnist" {
                    mnist()
                } else {
                    fashion()
                };
                (split.map(|s| &s.train), split)
            }
            other => panic!("{name}: unknown data set {other}"),
        };
        let Some(train) = train else {
            skip(&format!("{name}: data set {} not present", get("data")));
            continue;
        };
        let norm = case.get("norm").and_then(|v| v.as_str());
        match get("kind") {
            "gradient" => {
                let batch = case["batch_size"].as_u64().unwrap() as usize;
                let offset = case["offset"].as_u64().unwrap_or(0) as usize;
                let tol = case["tolerance_rel_l2"].as_f64().unwrap();
                let mut net = network(get("model"), norm, train, batch, algo);
                let expected = TensorFile::read(&dir.join(get("expected"))).unwrap();
                match case.get("init_xorshift").and_then(|v| v.as_object()) {
                    Some(spec) => {
                        for n in expected.tensors.keys().filter(|k| *k != "loss") {
                            assert!(spec.contains_key(n), "{name}: no init_xorshift for '{n}'");
                        }
                        xorshift_init(&mut net, spec);
                    }
                    None => checkpoint::load(&mut net, &dir.join(get("init"))).expect("init loads"),
                }
                let (loss, grads) = gradients(&mut net, train, offset, batch).unwrap();
                let want_loss = floats(&expected, "loss")[0];
                let mut worst = (
                    "loss".to_string(),
                    (loss - want_loss).abs() / want_loss.abs(),
                );
                let mut names: Vec<&String> =
                    expected.tensors.keys().filter(|k| *k != "loss").collect();
                names.sort();
                let got_names: Vec<&String> = grads.iter().map(|g| &g.name).collect();
                for n in &names {
                    assert!(
                        got_names.contains(n),
                        "{name}: bnlab has no gradient for '{n}' (it has {got_names:?})"
                    );
                }
                assert_eq!(
                    grads.len(),
                    names.len(),
                    "{name}: bnlab gives gradients for {got_names:?}, PyTorch for {names:?}"
                );
                for g in &grads {
                    let want = floats(&expected, &g.name);
                    let (_, shape) = (0, expected.shape(&g.name).unwrap());
                    assert_eq!(shape, g.shape.as_slice(), "{name}: shape of {}", g.name);
                    let got: Vec<f64> = g.values.iter().map(|&v| v as f64).collect();
                    let e = rel_l2(&got, &want);
                    if e > worst.1 {
                        worst = (g.name.clone(), e);
                    }
                }
                let ok = worst.1 <= tol;
                println!(
                    "{name} ({}): {} tensors, loss {loss:.6} (PyTorch {want_loss:.6}); worst {} at {:.3e}, tolerance {tol:.1e}: {}",
                    algo.name(),
                    grads.len(),
                    worst.0,
                    worst.1,
                    if ok { "ok" } else { "FAIL" }
                );
                if ok {
                    passed += 1;
                } else {
                    failures.push(name.clone());
                }
            }
            "eval" => {
                let data = split.expect("eval cases need a data set's test split");
                let want = case["test_correct"].as_u64().unwrap() as i64;
                let mut net = network(get("model"), norm, &data.train, 500, algo);
                checkpoint::load(&mut net, &dir.join(get("weights"))).expect("weights load");
                let mut ev = Evaluator::new(500, data.test.features());
                let got = ev
                    .evaluate(&mut net, &data.test, None, None)
                    .unwrap()
                    .correct as i64;
                let ok = (got - want).abs() <= 2;
                println!(
                    "{name} ({}): {got} correct, PyTorch {want} (allowed difference 2): {}",
                    algo.name(),
                    if ok { "ok" } else { "FAIL" }
                );
                if ok {
                    passed += 1;
                } else {
                    failures.push(name.clone());
                }
            }
            other => panic!("{name}: unknown case kind {other}"),
        }
    }
    assert!(failures.is_empty(), "failed cases: {failures:?}");
    passed
}

#[test]
fn committed_gradient_cases() {
    for algo in [ConvAlgo::Direct, ConvAlgo::Winograd] {
        let ran = run_cases(&common::committed_reference_dir().join("grad"), algo);
        assert!(ran >= 2, "only {ran} committed gradient cases ran");
    }
}

#[test]
fn pytorch_gradient_and_eval_cases() {
    let Some(dir) = shared_grad_dir() else {
        skip(
            "../shared/reference/grad ($BNLAB_REFERENCE_DIR/grad) not present; its whole-network \
             gradient cases (the committed ones in tests/data/reference/grad ran)",
        );
        return;
    };
    for algo in [ConvAlgo::Direct, ConvAlgo::Winograd] {
        assert!(run_cases(&dir, algo) > 0, "no case ran");
    }
}
