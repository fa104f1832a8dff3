//! The BN + ReLU and BN + sigmoid fusion (`Sequential::fuse`) computes the bits of the unfused
//! network: in training (forward, backward, a few SGD steps), at inference, in Algorithm 2's
//! pass, and in the backward passes that take the fused activation's derivative through a
//! buffer (ghost batches, batch renormalization, frozen BN, the sigmoid), on 1 and 3 threads.

use bnlab::model::{self, NormChoice};
use bnlab::network::Network;
use bnlab::nn::sequential::fuse_activations;
use bnlab::nn::{Ctx, Layer, Mode, Tanh};

/// Deterministic values in about [-1.5, 1.5] (not all positive, so the ReLUs cut).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0
        })
        .collect()
}

fn build(
    preset: &str,
    norm: &str,
    input: Option<&[usize]>,
    batch: usize,
    threads: usize,
) -> Network {
    let spec = model::apply_norm(
        &model::preset(preset).unwrap(),
        NormChoice::parse(norm).unwrap(),
    )
    .unwrap();
    let shape = model::resolve_input(&spec, input).unwrap();
    Network::build(&spec, &shape, 7, batch, threads).unwrap()
}

/// Every parameter gradient, as bits.
fn grad_bits(net: &mut Network) -> Vec<u32> {
    let mut out = Vec::new();
    net.body
        .for_each_param(&mut |_, g| out.extend(g.iter().map(|v| v.to_bits())));
    out
}

/// Every tensor of the state (parameters and buffers), as bits.
fn state_bits(net: &mut Network) -> Vec<u64> {
    let mut out = Vec::new();
    net.visit_state(&mut |_, _, mut t| {
        if let Some(v) = t.floats() {
            out.extend(v.iter().map(|v| v.to_bits() as u64));
        }
    });
    out
}

/// The BN layers that apply an activation themselves.
fn fused_layers(net: &mut Network) -> usize {
    let mut k = 0;
    net.for_each_batch_norm(&mut |bn| {
        if bn.fused_activation() != bnlab::kernels::batch_norm::Act::Identity {
            k += 1;
        }
    });
    k
}

/// Train, evaluate, run Algorithm 2's pass and differentiate at inference, fused and unfused:
/// every result bit for bit the same.
fn check(preset: &str, norm: &str, input: Option<&[usize]>, threads: usize, frozen: bool) {
    let what = format!("{preset} --norm {norm} on {threads} threads (frozen: {frozen})");
    let n = 8;
    let mut fused = build(preset, norm, input, n, threads);
    let mut plain = build(preset, norm, input, n, threads);
    fuse_activations(&mut plain.body, false);
    assert!(fused_layers(&mut fused) > 0, "{what}: nothing fused");
    assert_eq!(fused_layers(&mut plain), 0, "{what}");
    if frozen {
        for net in [&mut fused, &mut plain] {
            net.for_each_batch_norm(&mut |bn| bn.frozen = true);
        }
    }
    let features = fused.body.in_size();
    let classes = fused.body.out_size();
    for step in 0..3 {
        let x = values(n * features, step);
        let labels: Vec<usize> = (0..n).map(|i| (i * 7 + step as usize) % classes).collect();
        let la = fused.forward_backward(&x, &labels, n).unwrap();
        let lb = plain.forward_backward(&x, &labels, n).unwrap();
        assert_eq!(la.to_bits(), lb.to_bits(), "{what}: loss at step {step}");
        let (ga, gb) = (grad_bits(&mut fused), grad_bits(&mut plain));
        assert!(ga == gb, "{what}: gradients at step {step}");
        // Plain SGD, the same on both, so that the next step starts elsewhere.
        for net in [&mut fused, &mut plain] {
            net.body.for_each_param(&mut |w, g| {
                for (w, g) in w.iter_mut().zip(g) {
                    *w -= 0.5 * g;
                }
            });
        }
        assert!(
            state_bits(&mut fused) == state_bits(&mut plain),
            "{what}: state at step {step}"
        );
    }
    let x = values(n * features, 99);
    for mode in [Mode::Eval, Mode::Population] {
        let a = fused.forward(&x, n, mode).unwrap().to_vec();
        let b = plain.forward(&x, n, mode).unwrap().to_vec();
        let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{what}: logits in {mode:?}");
    }
    // The backward pass at inference (constant statistics), with the input gradient.
    let ctx = Ctx {
        mode: Mode::Eval,
        threads,
    };
    let dy = values(n * classes, 5);
    let mut dxs = Vec::new();
    for net in [&mut fused, &mut plain] {
        let mut y = vec![0f32; n * classes];
        net.body.forward(ctx, &x, &mut y, n).unwrap();
        let mut dx = vec![0f32; n * features];
        net.body.backward(ctx, &x, &y, &dy, Some(&mut dx), n);
        dxs.push((
            dx.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            grad_bits(net),
        ));
    }
    assert!(dxs[0] == dxs[1], "{what}: gradients at inference");
}

#[test]
fn fused_conv_nets_compute_the_unfused_bits() {
    for threads in [1, 3] {
        check("inception-mini-bn", "bn", None, threads, false);
        check("vgg-mini-bn", "bn", Some(&[1, 12, 12]), threads, false);
    }
    check("inception-mini-bn-sigmoid", "bn", None, 1, false);
    check("resnet20-bn", "bn", Some(&[3, 8, 8]), 3, false);
}

#[test]
fn fused_layers_with_their_own_backward_paths_compute_the_unfused_bits() {
    // Ghost batches and batch renormalization take the activation's derivative through a
    // buffer; frozen BN normalizes with constants in training.
    for norm in ["ghost:3", "brn"] {
        check("vgg-mini-bn", norm, Some(&[1, 12, 12]), 1, false);
    }
    check("vgg-mini-bn", "bn", Some(&[1, 12, 12]), 3, true);
}

#[test]
fn fused_mlp_computes_the_unfused_bits() {
    // The fully connected layout: BN + sigmoid (Figure 1's net).
    for threads in [1, 3] {
        check("mlp-fig1-bn", "bn", None, threads, false);
        check("mlp-fig1-bn", "ghost:4", None, threads, false);
    }
}

/// A probe that reads a fused layer's output gets it after `keep_output`, with the same values
/// as in the unfused network; without it, a clear panic rather than stale values.
#[test]
fn keep_output_restores_a_fused_layers_output() {
    let n = 6;
    let mut fused = build("mlp-fig1-bn", "bn", None, n, 1);
    let mut plain = build("mlp-fig1-bn", "bn", None, n, 1);
    fuse_activations(&mut plain.body, false);
    // Layers: Linear, BN, Sigmoid, ...: the first BN is layer 1.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fused.body.output_of(1).len()
    }));
    assert!(r.is_err(), "output_of a fused layer must refuse");
    fused.body.keep_output(1);
    let before = fused_layers(&mut fused);
    let x = values(n * 784, 3);
    fused.forward(&x, n, Mode::Train).unwrap();
    plain.forward(&x, n, Mode::Train).unwrap();
    let (a, b) = (fused.body.output_of(1), plain.body.output_of(1));
    assert!(!a.is_empty());
    assert_eq!(&a[..n * 100], &b[..n * 100]);
    // The other BN layers stay fused.
    assert!(before >= 2, "{before}");
}

/// A fused network whose layers are replaced afterwards (as a library user may: the layers are
/// public) runs every layer it has: a BN whose activation was swapped for another stops
/// applying the old one.
#[test]
fn replacing_a_fused_activation_undoes_the_fusion() {
    let n = 6;
    let mut fused = build("mlp-fig1-bn", "bn", None, n, 1);
    let mut plain = build("mlp-fig1-bn", "bn", None, n, 1);
    fuse_activations(&mut plain.body, false);
    for net in [&mut fused, &mut plain] {
        // Layers: Linear, BN, Sigmoid, ...: the first sigmoid is layer 2.
        assert_eq!(net.body.layers[2].describe(), "Sigmoid()");
        net.body.layers[2] = Box::new(Tanh::new(100));
    }
    let x = values(n * 784, 4);
    for mode in [Mode::Train, Mode::Eval] {
        let a = fused.forward(&x, n, mode).unwrap().to_vec();
        let b = plain.forward(&x, n, mode).unwrap().to_vec();
        assert_eq!(a, b, "{mode:?}");
    }
    assert!(
        fused_layers(&mut fused) >= 1,
        "the other BN layers stay fused"
    );
}
