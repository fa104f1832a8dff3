//! `probe::ics` and `probe::landscape` (and `bnlab ics` / `bnlab landscape`) against an
//! independent float64 computation: a small MLP, Linear(6, 5) -> BatchNorm1d(5) -> Sigmoid ->
//! Linear(5, 4), whose loss and gradients this file computes by hand (forward and backward in
//! f64, checked against central differences). Also the identities that must hold (the first
//! weight layer has G' = G; `--lr 0` changes nothing; eta 0 gives loss0; the slope of the loss
//! along -g at 0 is -|g|^2), that the network is put back bit for bit (parameters, running
//! statistics, `num_batches_tracked`, dropout generators), a branching conv net, and the
//! command line's JSON and errors.

mod common;

use bnlab::checkpoint;
use bnlab::data::{load_mnist_dir, Dataset, Pixels};
use bnlab::model::{self, ModelSpec};
use bnlab::network::Network;
use bnlab::nn::{Layer, TensorMut};
use bnlab::probe::{self, ics, landscape, weight_layers};
use common::{fails_with, ok, Lcg};

const D: usize = 6;
const H: usize = 5;
const K: usize = 4;
const EPS: f64 = 1e-5;

const MLP: &str = r#"{
  "name": "probe-mlp",
  "input": [6],
  "init": {"Linear": {"weight": {"normal": 0.8}, "bias": "default"}},
  "layers": [
    {"type": "Linear", "out_features": 5},
    {"type": "BatchNorm1d"},
    {"type": "Sigmoid"},
    {"type": "Linear", "out_features": 4}
  ]
}"#;

/// The MLP with gamma and beta away from 1 and 0 and running statistics that are not the
/// defaults (so that a change would show).
fn mlp() -> Network {
    let spec = ModelSpec::parse(MLP, "probe-mlp").unwrap();
    let mut net = Network::build(&spec, &[D], 7, 16, 1).unwrap();
    let mut rng = Lcg(0xabcd_0123);
    net.visit_state(&mut |name, _, t| match (name, t) {
        ("1.weight", TensorMut::F32(v)) => v
            .iter_mut()
            .for_each(|g| *g = 1.0 + 0.4 * rng.next() as f32),
        ("1.bias", TensorMut::F32(v)) => v.iter_mut().for_each(|b| *b = 0.3 * rng.next() as f32),
        ("1.running_mean", TensorMut::F32(v)) => v.iter_mut().for_each(|m| *m = rng.next() as f32),
        ("1.running_var", TensorMut::F32(v)) => {
            v.iter_mut().for_each(|s| *s = 1.5 + rng.next() as f32)
        }
        ("1.num_batches_tracked", TensorMut::I64(n)) => *n = 17,
        _ => {}
    });
    net
}

/// 12 examples of 6 features in [-2, 2), labels 0..4.
fn data() -> Dataset {
    let mut rng = Lcg(0x5eed_0042);
    let n = 12;
    let x = rng.vec_f32(n * D, 2.0, 0.0);
    let labels = (0..n).map(|_| ((rng.next() + 1.0) * 2.0) as u8).collect();
    Dataset::new(Pixels::F32(x), labels, [1, 1, D], K).unwrap()
}

/// Every tensor of the state as bytes, by name (PyTorch layout).
fn state(net: &mut Network) -> Vec<(String, Vec<u8>)> {
    checkpoint::state_entries(net)
        .into_iter()
        .map(|(name, _, _, bytes)| (name, bytes))
        .collect()
}

fn f64s(bytes: &[u8]) -> Vec<f64> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
        .collect()
}

/// The MLP's parameters in `state_dict` order: W1 [H, D], b1, gamma, beta, W2 [K, H], b2.
type Params = [Vec<f64>; 6];
const NAMES: [&str; 6] = [
    "0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias",
];

fn params_of(net: &mut Network) -> Params {
    let s = state(net);
    NAMES.map(|n| f64s(&s.iter().find(|(m, _)| m == n).unwrap().1))
}

/// The batch as f64: `x` (n x D) and the labels.
fn batch_of(data: &Dataset, offset: usize, n: usize) -> (Vec<f64>, Vec<usize>) {
    let idx: Vec<usize> = (offset..offset + n).collect();
    let mut x = vec![0f32; n * D];
    let mut y = vec![0; n];
    data.fill_batch(&idx, &mut x, &mut y);
    (x.iter().map(|&v| v as f64).collect(), y)
}

fn sigmoid(v: f64) -> f64 {
    1.0 / (1.0 + (-v).exp())
}

/// The mean cross-entropy and the gradient of every parameter, in f64, written out from the
/// definitions (training-mode BN: batch mean, biased batch variance).
fn reference(p: &Params, x: &[f64], y: &[usize]) -> (f64, Params) {
    let n = y.len();
    let [w1, b1, gamma, beta, w2, b2] = p;
    let mut z1 = vec![0.0; n * H];
    for i in 0..n {
        for j in 0..H {
            z1[i * H + j] = b1[j] + (0..D).map(|c| x[i * D + c] * w1[j * D + c]).sum::<f64>();
        }
    }
    let mut mean = [0.0; H];
    let mut var = [0.0; H];
    for j in 0..H {
        mean[j] = (0..n).map(|i| z1[i * H + j]).sum::<f64>() / n as f64;
        var[j] = (0..n)
            .map(|i| (z1[i * H + j] - mean[j]).powi(2))
            .sum::<f64>()
            / n as f64;
    }
    let mut xhat = vec![0.0; n * H];
    let mut s = vec![0.0; n * H];
    for i in 0..n {
        for j in 0..H {
            xhat[i * H + j] = (z1[i * H + j] - mean[j]) / (var[j] + EPS).sqrt();
            s[i * H + j] = sigmoid(gamma[j] * xhat[i * H + j] + beta[j]);
        }
    }
    let mut loss = 0.0;
    let mut dz2 = vec![0.0; n * K];
    for i in 0..n {
        let z2: Vec<f64> = (0..K)
            .map(|k| b2[k] + (0..H).map(|j| s[i * H + j] * w2[k * H + j]).sum::<f64>())
            .collect();
        let m = z2.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + z2.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        loss += lse - z2[y[i]];
        for k in 0..K {
            dz2[i * K + k] = ((z2[k] - lse).exp() - (k == y[i]) as u8 as f64) / n as f64;
        }
    }
    loss /= n as f64;
    let mut g: Params = [
        vec![0.0; H * D],
        vec![0.0; H],
        vec![0.0; H],
        vec![0.0; H],
        vec![0.0; K * H],
        vec![0.0; K],
    ];
    let mut da = vec![0.0; n * H];
    for i in 0..n {
        for k in 0..K {
            g[5][k] += dz2[i * K + k];
            for j in 0..H {
                g[4][k * H + j] += dz2[i * K + k] * s[i * H + j];
            }
        }
        for j in 0..H {
            let ds: f64 = (0..K).map(|k| dz2[i * K + k] * w2[k * H + j]).sum();
            let sv = s[i * H + j];
            da[i * H + j] = ds * sv * (1.0 - sv);
        }
    }
    for j in 0..H {
        let sum_da: f64 = (0..n).map(|i| da[i * H + j]).sum();
        let sum_da_xhat: f64 = (0..n).map(|i| da[i * H + j] * xhat[i * H + j]).sum();
        g[2][j] = sum_da_xhat;
        g[3][j] = sum_da;
        let scale = gamma[j] / (n as f64 * (var[j] + EPS).sqrt());
        for i in 0..n {
            let dz1 = scale * (n as f64 * da[i * H + j] - sum_da - xhat[i * H + j] * sum_da_xhat);
            g[1][j] += dz1;
            for c in 0..D {
                g[0][j * D + c] += dz1 * x[i * D + c];
            }
        }
    }
    (loss, g)
}

fn step(p: &Params, g: &Params, eta: f64, upto: usize) -> Params {
    let mut q = p.clone();
    for t in 0..upto {
        for (w, d) in q[t].iter_mut().zip(&g[t]) {
            *w -= eta * d;
        }
    }
    q
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|a| a * a).sum::<f64>().sqrt()
}

fn diff_norm(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

fn sci(v: &[f64]) -> String {
    v.iter()
        .map(|e| format!("{e:.2e}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn rel(got: f64, want: f64) -> f64 {
    (got - want).abs() / want.abs().max(1e-300)
}

/// The hand-written f64 backward agrees with central differences of the f64 loss (so the
/// reference is right before anything is compared with it).
#[test]
fn reference_gradients_match_finite_differences() {
    let mut net = mlp();
    let p = params_of(&mut net);
    let (x, y) = batch_of(&data(), 3, 8);
    let (_, g) = reference(&p, &x, &y);
    let h = 1e-6;
    let mut worst: f64 = 0.0;
    for t in 0..6 {
        for e in 0..p[t].len() {
            let mut plus = p.clone();
            plus[t][e] += h;
            let mut minus = p.clone();
            minus[t][e] -= h;
            let num = (reference(&plus, &x, &y).0 - reference(&minus, &x, &y).0) / (2.0 * h);
            let err = (num - g[t][e]).abs() / (1e-3 + g[t][e].abs());
            worst = worst.max(err);
        }
    }
    println!("f64 reference vs central differences: worst error {worst:.2e}");
    assert!(worst < 1e-6, "worst {worst:.2e}");
}

#[test]
fn weight_layers_are_the_linear_weights_in_order() {
    assert_eq!(weight_layers(&mut mlp()), ["0.weight", "3.weight"]);
}

/// ics against the f64 reference at two step sizes; the first layer's G' is G.
#[test]
fn ics_matches_the_f64_reference() {
    let data = data();
    let (offset, n) = (3, 8);
    let mut net = mlp();
    let p = params_of(&mut net);
    let (x, y) = batch_of(&data, offset, n);
    let (_, g) = reference(&p, &x, &y);
    let mut worst: f64 = 0.0;
    for lr in [0.5, 3.0] {
        let layers = ics(&mut net, &data, offset, n, lr).unwrap();
        assert_eq!(layers.len(), 2);
        assert_eq!(layers[0].name, "0.weight");
        assert_eq!(
            layers[0].l2_diff, 0.0,
            "nothing comes before the first layer"
        );
        assert_eq!(layers[0].cosine, Some(1.0));
        assert!(rel(layers[0].grad_norm, norm(&g[0])) < 1e-5);
        // The second Linear: W1, b1, gamma and beta step first.
        let moved = step(&p, &g, lr, 4);
        let (_, g2) = reference(&moved, &x, &y);
        let (want_diff, want_norm) = (diff_norm(&g[4], &g2[4]), norm(&g[4]));
        let dot: f64 = g[4].iter().zip(&g2[4]).map(|(a, b)| a * b).sum();
        let want_cos = dot / (want_norm * norm(&g2[4]));
        let l = &layers[1];
        assert_eq!(l.name, "3.weight");
        let errs = [
            rel(l.l2_diff, want_diff),
            rel(l.grad_norm, want_norm),
            (l.cosine.unwrap() - want_cos).abs(),
        ];
        println!(
            "lr {lr}: 3.weight l2_diff {:.6e} (f64 {want_diff:.6e}), cosine {:.8} (f64 \
             {want_cos:.8}), grad_norm {:.6e} (f64 {want_norm:.6e}); errors {}",
            l.l2_diff,
            l.cosine.unwrap(),
            l.grad_norm,
            sci(&errs)
        );
        assert!(want_diff > 1e-2 * want_norm, "the shift must be visible");
        for e in errs {
            worst = worst.max(e);
        }
    }
    assert!(worst < 1e-4, "worst relative error {worst:.2e}");
}

/// landscape against the f64 reference: loss0, |g|, the loss and gradient change at each eta,
/// beta-smoothness; eta 0 gives loss0 and no change, bit for bit.
#[test]
fn landscape_matches_the_f64_reference() {
    let data = data();
    let (offset, n) = (2, 10);
    let mut net = mlp();
    let p = params_of(&mut net);
    let (x, y) = batch_of(&data, offset, n);
    let (loss0, g) = reference(&p, &x, &y);
    let gnorm = norm(&g.concat());
    let etas = [0.0, 0.1, 0.5, 2.0, 8.0];
    let l = landscape(&mut net, &data, offset, n, &etas).unwrap();
    let mut errs = vec![rel(l.loss0, loss0), rel(l.grad_norm, gnorm)];
    assert_eq!(l.points[0].loss, l.loss0);
    assert_eq!(l.points[0].grad_change, 0.0);
    let mut beta: f64 = 0.0;
    for (pt, &eta) in l.points.iter().zip(&etas) {
        assert_eq!(pt.eta, eta);
        let (loss, ge) = reference(&step(&p, &g, eta, 6), &x, &y);
        let change = diff_norm(&ge.concat(), &g.concat());
        println!(
            "eta {eta}: loss {:.8} (f64 {loss:.8}), grad_change {:.6e} (f64 {change:.6e})",
            pt.loss, pt.grad_change
        );
        errs.push(rel(pt.loss, loss));
        if eta > 0.0 {
            errs.push(rel(pt.grad_change, change));
            beta = beta.max(change / (eta * gnorm));
        }
    }
    let got_beta = l.beta_smoothness.unwrap();
    errs.push(rel(got_beta, beta));
    println!(
        "beta-smoothness {got_beta:.6e} (f64 {beta:.6e}); relative errors {}",
        sci(&errs)
    );
    let worst = errs.iter().cloned().fold(0.0, f64::max);
    assert!(worst < 1e-4, "worst relative error {worst:.2e}");
}

/// d/deta L(theta - eta g) at 0 is -|g|^2: central differences of the measured losses.
#[test]
fn landscape_slope_at_zero_is_minus_grad_norm_squared() {
    let data = data();
    let mut net = mlp();
    let h = 1e-3;
    let l = landscape(&mut net, &data, 0, 12, &[-h, h]).unwrap();
    let slope = (l.points[1].loss - l.points[0].loss) / (2.0 * h);
    let want = -l.grad_norm * l.grad_norm;
    println!("slope {slope:.6e}, -|g|^2 {want:.6e}");
    assert!(rel(slope, want) < 1e-3, "slope {slope}, -|g|^2 {want}");
}

/// A network with dropout: lr 0 gives G' = G for every layer (same batch, same masks), a
/// repeated measurement gives the same numbers, and afterwards the network is as it was, bit
/// for bit: parameters, running statistics, num_batches_tracked and the dropout generators.
#[test]
fn measurements_leave_the_network_exactly_as_it_was() {
    let spec = ModelSpec::parse(
        r#"{"name": "d", "input": [6], "layers": [
            {"type": "Linear", "out_features": 8}, {"type": "BatchNorm1d"}, {"type": "ReLU"},
            {"type": "Dropout", "p": 0.5},
            {"type": "Linear", "out_features": 8}, {"type": "BatchNorm1d"}, {"type": "Tanh"},
            {"type": "Linear", "out_features": 4}]}"#,
        "d",
    )
    .unwrap();
    let data = data();
    let mut net = Network::build(&spec, &[D], 3, 12, 1).unwrap();
    // Running statistics that are not the defaults.
    net.visit_state(&mut |name, _, t| match t {
        TensorMut::F32(v) if name.contains("running") => v.iter_mut().for_each(|r| *r += 0.25),
        TensorMut::I64(v) => *v = 5,
        _ => {}
    });
    let rngs = |net: &mut Network| {
        let mut out = Vec::new();
        net.body
            .for_each_rng(&mut |r| out.push((r.get_seed(), r.get_word_pos())));
        out
    };
    let before = (state(&mut net), rngs(&mut net));
    let zero = ics(&mut net, &data, 1, 8, 0.0).unwrap();
    assert_eq!(zero.len(), 3);
    for l in &zero {
        assert_eq!(l.l2_diff, 0.0, "{}: lr 0", l.name);
        assert_eq!(l.cosine, Some(1.0), "{}: lr 0", l.name);
    }
    assert_eq!((state(&mut net), rngs(&mut net)), before);
    let a = ics(&mut net, &data, 1, 8, 0.7).unwrap();
    assert_eq!((state(&mut net), rngs(&mut net)), before);
    let b = ics(&mut net, &data, 1, 8, 0.7).unwrap();
    assert_eq!(a, b, "a repeated measurement gives the same numbers");
    assert!(a[1].l2_diff > 0.0 && a[2].l2_diff > 0.0);
    for l in &a {
        assert_eq!(
            l.grad_norm,
            zero.iter().find(|z| z.name == l.name).unwrap().grad_norm
        );
    }
    let la = landscape(&mut net, &data, 1, 8, &[0.0, 0.3, 1.0]).unwrap();
    assert_eq!((state(&mut net), rngs(&mut net)), before);
    assert_eq!(la.points[0].grad_change, 0.0, "eta 0 with the same masks");
    assert_eq!(la.points[0].loss, la.loss0);
    let lb = landscape(&mut net, &data, 1, 8, &[0.0, 0.3, 1.0]).unwrap();
    assert_eq!(la, lb);
    // And the gradient norm is that of train::gradients on the same batch.
    let (loss, grads) = bnlab::train::gradients(&mut net, &data, 1, 8).unwrap();
    assert_eq!(loss, la.loss0);
    let gn = grads
        .iter()
        .flat_map(|g| &g.values)
        .map(|&v| v as f64 * v as f64)
        .sum::<f64>()
        .sqrt();
    assert!(rel(la.grad_norm, gn) < 1e-12);
}

/// A branching conv net (a user-written ResNet): the weight layers are every Conv2d and the
/// Linear in `state_dict` order; the identities hold and the network is put back.
#[test]
fn a_branching_conv_net() {
    let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models/examples/resnet14-narrow.json");
    let spec = model::resolve(file.to_str().unwrap()).unwrap();
    let input = model::resolve_input(&spec, Some(&[1, 8, 8])).unwrap();
    let mut net = Network::build(&spec, &input, 1, 4, 1).unwrap();
    let mut rng = Lcg(99);
    let n = 6;
    let x = rng.vec_f32(n * 64, 1.0, 0.0);
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    let data = Dataset::new(Pixels::F32(x), labels, [1, 8, 8], 10).unwrap();
    // Independently: the `.weight` tensors of 2 or 4 dimensions (BN's are 1-D).
    let want: Vec<String> = checkpoint::state_entries(&mut net)
        .into_iter()
        .filter(|(name, _, shape, _)| name.ends_with(".weight") && shape.len() != 1)
        .map(|(name, ..)| name)
        .collect();
    assert_eq!(weight_layers(&mut net), want);
    // conv1, two blocks of two convs in each of three stages, two downsampling convs, fc.
    assert_eq!(want.len(), 16);
    assert!(want.iter().any(|w| w.contains("downsample")));
    let before = state(&mut net);
    let zero = ics(&mut net, &data, 2, 4, 0.0).unwrap();
    assert!(zero.iter().all(|l| l.l2_diff == 0.0));
    let layers = ics(&mut net, &data, 2, 4, 0.1).unwrap();
    assert_eq!(state(&mut net), before);
    let names: Vec<&str> = layers.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, want);
    assert_eq!(layers[0].l2_diff, 0.0);
    assert_eq!(layers[0].cosine, Some(1.0));
    assert!(layers[1..].iter().all(|l| l.l2_diff > 0.0));
    let l = landscape(&mut net, &data, 2, 4, &[0.0, 0.1]).unwrap();
    assert_eq!(state(&mut net), before);
    assert_eq!(l.points[0].grad_change, 0.0);
    assert!(l.beta_smoothness.unwrap() > 0.0);
}

#[test]
fn library_errors_leave_the_network_unchanged() {
    let data = data();
    let mut net = mlp();
    let before = state(&mut net);
    let msg = |e: bnlab::Error| e.to_string();
    assert!(msg(ics(&mut net, &data, 0, 8, -1.0).unwrap_err()).contains("--lr"));
    assert!(msg(ics(&mut net, &data, 0, 8, f64::NAN).unwrap_err()).contains("--lr"));
    assert!(msg(ics(&mut net, &data, 8, 8, 0.1).unwrap_err()).contains("--offset"));
    assert!(msg(ics(&mut net, &data, 0, 1, 0.1).unwrap_err()).contains("at least 2"));
    assert!(msg(landscape(&mut net, &data, 0, 8, &[]).unwrap_err()).contains("--etas"));
    assert!(
        msg(landscape(&mut net, &data, 0, 8, &[0.1, f64::INFINITY]).unwrap_err())
            .contains("--etas")
    );
    assert!(msg(landscape(&mut net, &data, 5, 8, &[0.1]).unwrap_err()).contains("--offset"));
    assert_eq!(state(&mut net), before);
    assert_eq!(probe::parse_etas("0.5, 1,2e-1").unwrap(), [0.5, 1.0, 0.2]);
    for bad in ["", " ", "0.1,", "a", "0.1,,0.2", "nan", "1,inf"] {
        let e = probe::parse_etas(bad).unwrap_err().to_string();
        assert!(e.contains("--etas"), "{bad:?}: {e}");
    }
}

/// The commands: text, the JSON object as the last line (the same numbers as the library's),
/// and clear errors.
#[test]
fn the_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("mnist");
    common::synthetic_mnist(&dir, 100, 10);
    let d = dir.to_str().unwrap();
    let w = tmp.path().join("w.safetensors");
    let mut net = Network::preset("mlp-fig1-bn", 5, 16, 1).unwrap();
    checkpoint::save(&mut net, &w).unwrap();
    let w = w.to_str().unwrap();
    let args = |cmd: &str, extra: &[&str]| -> Vec<String> {
        [cmd, "--model", "mlp-fig1-bn", "--weights", w, "--data", d]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let run = |cmd: &str, extra: &[&str]| {
        let a = args(
            cmd,
            &[&["--batch-size", "16", "--offset", "7"], extra].concat(),
        );
        ok(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let fails = |cmd: &str, extra: &[&str], needles: &[&str]| {
        let a = args(cmd, extra);
        fails_with(&a.iter().map(String::as_str).collect::<Vec<_>>(), needles)
    };
    let train = load_mnist_dir(&dir).unwrap().train;

    let out = run("ics", &["--lr", "0.2", "--json"]);
    assert!(out.contains("3.weight"), "{out}");
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let layers = json["layers"].as_array().unwrap();
    let want = ics(&mut net, &train, 7, 16, 0.2).unwrap();
    assert_eq!(layers.len(), 4);
    for (j, l) in layers.iter().zip(&want) {
        let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["cosine", "grad_norm", "l2_diff", "name"]);
        assert_eq!(j["name"], l.name.as_str());
        // (serde_json's parsing may be 1 ulp off; the printed text is compared below.)
        assert!(rel(j["l2_diff"].as_f64().unwrap(), l.l2_diff) < 1e-15);
        assert!(rel(j["grad_norm"].as_f64().unwrap(), l.grad_norm) < 1e-15);
    }
    // The same numbers as the library's, digit for digit.
    assert_eq!(
        out.lines().last().unwrap(),
        format!("{{\"layers\":{}}}", serde_json::to_string(&want).unwrap())
    );
    assert_eq!(layers[0]["name"], "0.weight");
    assert_eq!(layers[0]["l2_diff"], 0.0);
    assert_eq!(layers[3]["name"], "9.weight");
    assert!(layers[3]["l2_diff"].as_f64().unwrap() > 0.0);

    // Two threads give the same bits; --lr 0 changes no gradient.
    let two = run("ics", &["--lr", "0.2", "--json", "--threads", "2"]);
    assert_eq!(two.lines().last(), out.lines().last());
    let zero = run("ics", &["--lr", "0", "--json"]);
    let zero: serde_json::Value = serde_json::from_str(zero.lines().last().unwrap()).unwrap();
    for l in zero["layers"].as_array().unwrap() {
        assert_eq!(l["l2_diff"], 0.0, "{l}");
        assert_eq!(l["cosine"], 1.0, "{l}");
    }

    let out = run("landscape", &["--etas", "0,0.1,0.4", "--json"]);
    let two = run(
        "landscape",
        &["--etas", "0,0.1,0.4", "--json", "--threads", "2"],
    );
    assert_eq!(two.lines().last(), out.lines().last());
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let want = landscape(&mut net, &train, 7, 16, &[0.0, 0.1, 0.4]).unwrap();
    let mut keys: Vec<&str> = json
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["beta_smoothness", "grad_norm", "loss0", "points"]);
    assert_eq!(
        out.lines().last().unwrap(),
        serde_json::to_string(&want).unwrap()
    );
    let points = json["points"].as_array().unwrap();
    assert_eq!(points.len(), 3);
    for j in points {
        let mut keys: Vec<&str> = j.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort();
        assert_eq!(keys, ["eta", "grad_change", "loss"]);
    }
    assert!(json["beta_smoothness"].as_f64().unwrap() > 0.0);
    assert_eq!(points[0]["loss"], json["loss0"]);
    assert_eq!(points[0]["grad_change"], 0.0);
    // A step so large that the gradients overflow: still a JSON object (null for NaN).
    let out = run("landscape", &["--etas", "1e30", "--json"]);
    let json: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let p = &json["points"][0];
    assert!(p["loss"].as_f64().is_none_or(|l| l > 1e20), "{json}");
    assert!(p["grad_change"].is_null() || p["grad_change"].as_f64().unwrap() > 0.0);
    // Without --json: no JSON line; eta 0 alone leaves beta-smoothness undefined.
    let out = run("landscape", &["--etas", "0"]);
    assert!(out.contains("undefined") && !out.contains('{'), "{out}");

    let b16 = |extra: &[&'static str]| [&["--batch-size", "16"], extra].concat();
    fails(
        "ics",
        &b16(&["--lr", "-0.1"]),
        &["--lr", "must be finite and >= 0"],
    );
    fails("ics", &b16(&["--lr", "nan"]), &["--lr", "must be finite"]);
    fails("ics", &b16(&[]), &["--lr"]);
    fails(
        "landscape",
        &b16(&["--etas", ""]),
        &["--etas", "no step size"],
    );
    fails(
        "landscape",
        &b16(&["--etas", "0.1,abc"]),
        &["--etas", "'abc'"],
    );
    fails(
        "landscape",
        &b16(&["--etas", "0.1,inf"]),
        &["--etas", "'inf'"],
    );
    fails("landscape", &b16(&[]), &["--etas"]);
    fails(
        "ics",
        &b16(&["--lr", "0.1", "--offset", "90"]),
        &["--offset", "100 examples"],
    );
    fails(
        "ics",
        &b16(&["--lr", "0.1", "--offset", "-1"]),
        &["--offset", ">= 0"],
    );
    fails(
        "landscape",
        &["--etas", "0.1", "--batch-size", "1"],
        &["--batch-size", "at least 2"],
    );
    fails(
        "landscape",
        &["--etas", "0.1", "--batch-size", "0"],
        &["--batch-size"],
    );
    // A model without weights, and weights of another model.
    fails_with(
        &[
            "ics",
            "--model",
            "mlp-fig1-bn",
            "--data",
            d,
            "--batch-size",
            "8",
            "--lr",
            "0.1",
        ],
        &["--weights"],
    );
    fails_with(
        &[
            "landscape",
            "--model",
            "mlp-fig1-bn",
            "--weights",
            "/nonexistent/w.safetensors",
            "--data",
            d,
            "--batch-size",
            "8",
            "--etas",
            "0.1",
        ],
        &["/nonexistent/w.safetensors"],
    );
    fails_with(
        &[
            "ics",
            "--model",
            "mlp-fig1",
            "--weights",
            w,
            "--data",
            d,
            "--batch-size",
            "8",
            "--lr",
            "0.1",
        ],
        &["for mlp-fig1-bn, not mlp-fig1"],
    );
}
