//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// `../shared` next to the project (or `$BNLAB_SHARED_DIR`), if present.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("BNLAB_SHARED_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"),
    };
    dir.is_dir().then_some(dir)
}

pub fn mnist_dir() -> Option<PathBuf> {
    let d = shared_dir()?.join("datasets/mnist");
    d.is_dir().then_some(d)
}

/// Deterministic pseudo-random numbers in [-1, 1) (xorshift), so tests need no RNG crate.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
    pub fn vec_f32(&mut self, n: usize, scale: f64, offset: f64) -> Vec<f32> {
        (0..n)
            .map(|_| (offset + scale * self.next()) as f32)
            .collect()
    }
}
