//! The training step allocates nothing: every buffer is sized once per network. Checked with a
//! counting global allocator over many steps after a warm-up, on one and two threads.

mod common;

use bnlab::data::load_mnist_dir;
use bnlab::network::Network;
use bnlab::optim::Schedule;
use bnlab::presets::Preset;
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

#[test]
fn training_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dir) = common::mnist_dir() else {
        eprintln!("note: MNIST not present; skipped");
        return;
    };
    let data = load_mnist_dir(&dir).unwrap();
    for preset in [Preset::MlpFig1, Preset::MlpFig1Bn] {
        for threads in [1, 2] {
            let cfg = TrainConfig {
                steps: 300,
                batch_size: 60,
                lr: 0.1,
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
            let mut net = Network::new(preset, 3, 60, threads);
            let mut t = Trainer::new(cfg, data.train.len(), data.train.features());
            for _ in 0..20 {
                t.step(&mut net, &data.train).unwrap();
            }
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            // 1,200 steps cross an epoch boundary (1,000 batches of 60), so reshuffling is
            // covered too.
            for _ in 0..1200 {
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

/// The convolutional presets too: im2col workspaces, transposed gradients and all products
/// (our own kernels; no `gemm`-crate call, which would allocate packing buffers) are sized at
/// `reserve`. Both the BN net and the no-BN net with dropout, on one and two threads.
#[test]
fn convolutional_training_steps_do_not_allocate() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dir) = common::mnist_dir() else {
        eprintln!("note: MNIST not present; skipped");
        return;
    };
    // The inception-mini presets take 28x28 grey images: MNIST's shape.
    let data = load_mnist_dir(&dir).unwrap();
    for preset in [Preset::InceptionMiniBn, Preset::InceptionMini] {
        for threads in [1, 2] {
            let cfg = TrainConfig {
                steps: 100,
                batch_size: 32,
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 5e-4,
                schedule: Schedule::Exponential {
                    every: 100,
                    gamma: 0.9,
                },
                seed: 3,
                order: Order::Shuffle,
                eval_every: 0,
                threads,
            };
            let mut net = Network::new(preset, 3, 32, threads);
            let mut t = Trainer::new(cfg, data.train.len(), data.train.features());
            for _ in 0..3 {
                t.step(&mut net, &data.train).unwrap();
            }
            let before = ALLOCATIONS.load(Ordering::SeqCst);
            for _ in 0..25 {
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
