//! The training step allocates nothing: every buffer is sized once per network. Checked with a
//! counting global allocator over many steps after a warm-up, on one and two threads.

mod common;

use bnlab::data::load_mnist_dir;
use bnlab::network::Network;
use bnlab::optim::Schedule;
use bnlab::train::{Order, TrainConfig, Trainer};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, counting calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The counter is global: the tests of this file take turns, or one would count the other's
/// allocations.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Train `preset` for `warmup` steps, then count the allocations of `steps` more, on 1 and 2
/// threads; SGD with momentum, weight decay and an exponential schedule, shuffled batches.
fn assert_steps_allocate_nothing(
    presets: &[&str],
    batch: usize,
    lr: f64,
    warmup: usize,
    steps: usize,
) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dir) = common::mnist_dir() else {
        eprintln!("note: MNIST not present; skipped");
        return;
    };
    // The inception-mini presets take 28x28 grey images: MNIST's shape.
    let data = load_mnist_dir(&dir).unwrap();
    for &preset in presets {
        for threads in [1, 2] {
            let cfg = TrainConfig {
                steps: warmup + steps,
                batch_size: batch,
                lr,
                momentum: 0.9,
                weight_decay: 1e-4,
                schedule: Schedule::Exponential {
                    every: 100,
                    gamma: 0.9,
                },
                seed: 3,
                order: Order::Shuffle,
                eval_every: 0,
                threads,
            };
            let mut net = Network::preset(preset, 3, batch, threads).unwrap();
            let mut t = Trainer::new(cfg, data.train.len(), data.train.features());
            for _ in 0..warmup {
                t.step(&mut net, &data.train).unwrap();
            }
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            for _ in 0..steps {
                t.step(&mut net, &data.train).unwrap();
            }
            let after = ALLOCATIONS.load(Ordering::SeqCst);
            assert_eq!(
                after - before,
                0,
                "{preset:?}, {threads} threads: allocations in steps"
            );
        }
    }
}

#[test]
fn training_steps_do_not_allocate() {
    // 1,200 steps cross an epoch boundary (1,000 batches of 60), so reshuffling is covered too.
    assert_steps_allocate_nothing(&["mlp-fig1", "mlp-fig1-bn"], 60, 0.1, 20, 1200);
}

/// The convolutional presets too: im2col workspaces, transposed gradients and all products
/// (our own kernels; no `gemm`-crate call, which would allocate packing buffers) are sized at
/// `reserve`. Both the BN net and the no-BN net with dropout.
#[test]
fn convolutional_training_steps_do_not_allocate() {
    assert_steps_allocate_nothing(
        &["inception-mini-bn", "inception-mini"],
        32,
        0.05,
        3,
        25,
    );
}
