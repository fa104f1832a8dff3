//! Inverted dropout: in training each value is kept with probability 1 - p and scaled by
//! 1 / (1 - p), so inference is the identity.

use super::{backward_nothing, check_forward, Ctx, Layer, Mode};
use crate::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Inverted dropout on `size` features per example (PyTorch's `nn.Dropout(p)`).
///
/// Works without `reserve` (the mask is sized by the first training-mode forward pass of a
/// larger batch). `backward` before any forward pass, or with another batch size than the last
/// forward's, fills `dx` with zeros.
pub struct Dropout {
    size: usize,
    /// The probability of dropping each value, in `[0, 1]`.
    pub p: f32,
    rng: ChaCha8Rng,
    mask: Vec<f32>,
    last_train: bool,
    /// The batch size of the last successful forward pass (0: none).
    last_n: usize,
}

impl Dropout {
    /// Dropout with probability `p` on `size` values per example; masks drawn from a generator
    /// seeded with `seed`.
    pub fn new(size: usize, p: f32, seed: u64) -> Self {
        Dropout {
            size,
            p,
            rng: ChaCha8Rng::seed_from_u64(seed),
            mask: Vec::new(),
            last_train: false,
            last_n: 0,
        }
    }
}

impl Layer for Dropout {
    fn in_size(&self) -> usize {
        self.size
    }
    fn out_size(&self) -> usize {
        self.size
    }
    fn reserve(&mut self, max_batch: usize) {
        let len = max_batch * self.size;
        if self.mask.len() < len {
            self.mask.resize(len, 0.0);
        }
    }
    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        check_forward(self, x, y, n)?;
        self.last_n = n;
        let len = n * self.size;
        self.last_train = ctx.mode == Mode::Train && self.p > 0.0;
        if !self.last_train {
            y[..len].copy_from_slice(&x[..len]);
            return Ok(());
        }
        self.reserve(n);
        let keep = 1.0 - self.p;
        let scale = if keep > 0.0 { 1.0 / keep } else { 0.0 };
        for m in &mut self.mask[..len] {
            *m = if self.rng.gen::<f32>() < keep {
                scale
            } else {
                0.0
            };
        }
        for ((o, &v), &m) in y[..len].iter_mut().zip(&x[..len]).zip(&self.mask[..len]) {
            *o = v * m;
        }
        Ok(())
    }
    fn backward(
        &mut self,
        _ctx: Ctx,
        _x: &[f32],
        _y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        if n != self.last_n {
            return backward_nothing(self, dx, n);
        }
        let Some(dx) = dx else { return };
        let len = n * self.size;
        if self.last_train {
            for ((o, &g), &m) in dx[..len].iter_mut().zip(&dy[..len]).zip(&self.mask[..len]) {
                *o = g * m;
            }
        } else {
            dx[..len].copy_from_slice(&dy[..len]);
        }
    }
    fn for_each_rng(&mut self, f: &mut dyn FnMut(&mut ChaCha8Rng)) {
        f(&mut self.rng)
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        format!("Dropout(p={})", self.p)
    }
}
