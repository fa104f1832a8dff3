//! The presets train bit for bit as they did before networks became model files: a few SGD
//! steps (momentum, weight decay) on synthetic batches from a fixed generator, then a hash of
//! every `state_dict` tensor and of the last logits. The expected hashes were recorded with the
//! hand-built presets (commit 0fc9583) before the model-file builder replaced them.

use bnlab::network::Network;
use bnlab::nn::{Mode, TensorMut};
use bnlab::optim::{Schedule, Sgd};

/// FNV-1a over the bits of every value, names included.
fn fnv(h: &mut u64, bytes: &[u8]) {
    for &b in bytes {
        *h ^= b as u64;
        *h = h.wrapping_mul(0x100_0000_01b3);
    }
}

fn state_hash(net: &mut Network) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    net.visit_state(&mut |name, shape, t| {
        fnv(&mut h, name.as_bytes());
        for d in shape {
            fnv(&mut h, &(*d as u64).to_le_bytes());
        }
        match t {
            TensorMut::F32(v) | TensorMut::F32T(v) => {
                for x in v.iter() {
                    fnv(&mut h, &x.to_bits().to_le_bytes());
                }
            }
            TensorMut::I64(v) => fnv(&mut h, &v.to_le_bytes()),
        }
    });
    h
}

/// Pixels in [0, 1] with many exact zeros (as images have), labels 0..10, from an LCG.
fn batch(step: u64, n: usize, features: usize) -> (Vec<f32>, Vec<usize>) {
    let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ step.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let mut next = || {
        s = s
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (s >> 33) as u32
    };
    let x = (0..n * features)
        .map(|_| {
            let r = next();
            if r % 3 == 0 {
                0.0
            } else {
                (r % 256) as f32 / 255.0
            }
        })
        .collect();
    let y = (0..n).map(|_| (next() % 10) as usize).collect();
    (x, y)
}

fn golden(model: &str) -> (u64, u64) {
    golden_of(common_network(model, 7, 6))
}

fn golden_of(mut net: Network) -> (u64, u64) {
    let n = 6;
    let features = 784;
    let mut sgd = Sgd::new(0.05, 0.9, 5e-4, Schedule::Constant);
    for step in 0..3 {
        let (x, y) = batch(step, n, features);
        net.forward_backward(&x, &y, n).expect("step");
        assert!(sgd.step(&mut net));
    }
    let (x, _) = batch(99, n, features);
    let logits = net.forward(&x, n, Mode::Eval).expect("eval").to_vec();
    let mut hl = 0xcbf2_9ce4_8422_2325u64;
    for v in logits {
        fnv(&mut hl, &v.to_bits().to_le_bytes());
    }
    (state_hash(&mut net), hl)
}

fn common_network(model: &str, seed: u64, n: usize) -> Network {
    Network::preset(model, seed, n, 1).expect("preset builds")
}

#[test]
fn presets_train_bit_for_bit_as_before() {
    let expected: &[(&str, u64, u64)] = &[
        ("mlp-fig1", 0x1f8d083e22467624, 0x62e61c296275c3c9),
        ("mlp-fig1-bn", 0x7ef475b51b165897, 0x710b681291cb1192),
        ("inception-mini", 0xca9d6388e3fc3007, 0x2f9867b1260e3852),
        ("inception-mini-bn", 0x02c6279e918ae0b2, 0xe155939835eecca6),
        (
            "inception-mini-bn-sigmoid",
            0x3187d6e10b9a94fb,
            0x1b7f88f80cf393b1,
        ),
        (
            "inception-mini-sigmoid",
            0x5a2e18eba5e5409a,
            0x9f546fcacb6b86e2,
        ),
        (
            "inception-mini-bn-dropout",
            0x0f91833eaddb58a7,
            0x6b2600c40f2e1592,
        ),
    ];
    for (name, _, _) in expected {
        let (s, l) = golden(name);
        println!("(\"{name}\", {s:#018x}, {l:#018x}),");
        let &(_, es, el) = expected.iter().find(|e| e.0 == *name).unwrap();
        assert_eq!((s, l), (es, el), "{name}: state or logits changed");
    }
}

/// A model file given by path, a copy of a preset's, trains bit for bit like the preset.
#[test]
fn a_model_file_equal_to_a_preset_trains_like_it() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["mlp-fig1-bn", "inception-mini-bn-dropout"] {
        let path = dir.path().join("copy.json");
        let text = bnlab::model::preset_text(name)
            .unwrap()
            .replace(&format!("\"name\": \"{name}\""), "\"name\": \"my-copy\"");
        std::fs::write(&path, text).unwrap();
        let spec = bnlab::model::resolve(path.to_str().unwrap()).unwrap();
        assert_eq!(spec.name, "my-copy");
        let input = bnlab::model::resolve_input(&spec, None).unwrap();
        let net = Network::build(&spec, &input, 7, 6, 1).unwrap();
        let from_file = golden_of(net);
        assert_eq!(from_file, golden(name), "{name}: state or logits differ");
    }
}
