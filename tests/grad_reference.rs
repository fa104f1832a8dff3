//! Whole-network gradients against PyTorch in float64 (`../shared/reference/grad`, see its
//! README): for every `gradient` case, the loss and the gradient of every parameter for one
//! training mini-batch must be within the case's relative-L2 tolerance, tensor by tensor, with
//! the same names; for every `eval` case, the PyTorch-trained checkpoint must classify within 2
//! of PyTorch's count of test images. One line per case is printed (worst tensor, error,
//! tolerance). Cases that need a normalizer bnlab does not have yet (`norm`) are reported as
//! skipped by name. With `BNLAB_REQUIRE_DATA=1` (CI) missing data fails instead of skipping.

mod common;

use bnlab::checkpoint::{self, Loaded, TensorFile};
use bnlab::data::{load_mnist_dir, Split};
use bnlab::model;
use bnlab::network::Network;
use bnlab::train::{gradients, Evaluator};
use std::path::PathBuf;
use std::sync::OnceLock;

fn require_data() -> bool {
    std::env::var_os("BNLAB_REQUIRE_DATA").is_some_and(|v| v == "1")
}

fn skip(what: &str) {
    assert!(!require_data(), "BNLAB_REQUIRE_DATA=1 but {what}");
    println!("SKIPPED: {what}");
}

fn fashion() -> Option<&'static Split> {
    static DATA: OnceLock<Option<Split>> = OnceLock::new();
    DATA.get_or_init(|| {
        let dir = std::env::var_os("BNLAB_FASHION_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| bnlab::data::FASHION_SYSTEM_DIR.into());
        dir.is_dir()
            .then(|| bnlab::data::fashion_mnist(Some(&dir)).expect("Fashion-MNIST loads"))
    })
    .as_ref()
}

fn mnist() -> Option<&'static Split> {
    static DATA: OnceLock<Option<Split>> = OnceLock::new();
    DATA.get_or_init(|| common::mnist_dir().map(|d| load_mnist_dir(&d).expect("MNIST loads")))
        .as_ref()
}

fn grad_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("BNLAB_REFERENCE_DIR") {
        Some(d) => PathBuf::from(d).join("grad"),
        None => common::shared_dir()?.join("reference/grad"),
    };
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

fn network(model_name: &str, data: &Split, max_batch: usize) -> Network {
    let spec = model::preset(model_name).expect("preset");
    let input = model::resolve_input(&spec, Some(&[1, data.train.rows, data.train.cols]))
        .expect("input shape");
    Network::build(&spec, &input, 0, max_batch, 1).expect("network builds")
}

#[test]
fn pytorch_gradient_and_eval_cases() {
    let Some(dir) = grad_dir() else {
        skip("../shared/reference/grad not present; whole-network gradient cases");
        return;
    };
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let mut failures = Vec::new();
    let mut passed = 0;
    for (name, case) in cases.as_object().expect("cases.json is an object") {
        let get = |k: &str| case.get(k).and_then(|v| v.as_str()).unwrap_or("");
        let data = match get("data") {
            "mnist" => mnist(),
            "fashion-mnist" => fashion(),
            other => panic!("{name}: unknown data set {other}"),
        };
        let Some(data) = data else {
            skip(&format!("{name}: data set {} not present", get("data")));
            continue;
        };
        if let Some(norm) = case.get("norm").and_then(|v| v.as_str()) {
            println!("{name}: SKIPPED (needs --norm {norm}: the normalizers issue)");
            continue;
        }
        match get("kind") {
            "gradient" => {
                let batch = case["batch_size"].as_u64().unwrap() as usize;
                let offset = case["offset"].as_u64().unwrap_or(0) as usize;
                let tol = case["tolerance_rel_l2"].as_f64().unwrap();
                let mut net = network(get("model"), data, batch);
                checkpoint::load(&mut net, &dir.join(get("init"))).expect("init loads");
                let expected = TensorFile::read(&dir.join(get("expected"))).unwrap();
                let (loss, grads) = gradients(&mut net, &data.train, offset, batch).unwrap();
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
                    "{name}: {} tensors, loss {loss:.6} (PyTorch {want_loss:.6}); worst {} at {:.3e}, tolerance {tol:.1e}: {}",
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
                let want = case["test_correct"].as_u64().unwrap() as i64;
                let mut net = network(get("model"), data, 500);
                checkpoint::load(&mut net, &dir.join(get("weights"))).expect("weights load");
                let mut ev = Evaluator::new(500, data.test.features());
                let got = ev
                    .evaluate(&mut net, &data.test, None, None)
                    .unwrap()
                    .correct as i64;
                let ok = (got - want).abs() <= 2;
                println!(
                    "{name}: {got} correct, PyTorch {want} (allowed difference 2): {}",
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
    assert!(passed > 0, "no case ran");
}
