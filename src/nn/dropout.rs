//! Inverted dropout: in training each value is kept with probability 1 - p and scaled by
//! 1 / (1 - p), so inference is the identity.
//!
//! In a data-parallel run (`set_dist`) every rank draws the mask of the whole global batch
//! from its generator (the same seed, so the same stream, on every rank) and keeps its own
//! slice's rows: the ranks' generators stay identical (checkpoints hold one state for all),
//! and P ranks drop exactly what one process with the whole batch drops.

use super::{backward_nothing, check_forward, Ctx, Layer, Mode};
use crate::dist::Dist;
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
    /// The data-parallel run this layer is a replica in (`set_dist`), if any.
    dist: Option<Dist>,
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
            dist: None,
        }
    }

    /// Make this layer one replica of a data-parallel run (`None`: a layer of its own): a
    /// training pass is then this rank's slice of the global batch the run's `Dist` names,
    /// and the mask is drawn for the whole global batch (see the module doc).
    pub fn set_dist(&mut self, dist: Option<Dist>) {
        self.dist = dist;
    }
}

/// For a training pass of `n` examples: how many of the global batch's examples come before
/// this rank's slice and after it. 0 and 0 in one process, and for a pass over a batch of
/// this rank's own (no global batch set, such as the probes' passes that every rank runs
/// whole): drawn as one process draws, which keeps the ranks' generators together as long as
/// every rank runs the same pass.
pub(crate) fn draws_around(dist: Option<&Dist>, n: usize) -> (usize, usize) {
    dist.filter(|d| d.comm.size() > 1)
        .and_then(|d| d.pass(n))
        .map_or((0, 0), |(batch, slice)| (slice.start, batch - slice.end))
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
        let (before, after) = draws_around(self.dist.as_ref(), n);
        self.reserve(n);
        let keep = 1.0 - self.p;
        let scale = if keep > 0.0 { 1.0 / keep } else { 0.0 };
        // The other ranks' rows of the global batch's mask: drawn and dropped.
        let size = self.size;
        let skip = |rng: &mut ChaCha8Rng, rows: usize| {
            for _ in 0..rows * size {
                let _: f32 = rng.gen();
            }
        };
        skip(&mut self.rng, before);
        for m in &mut self.mask[..len] {
            *m = if self.rng.gen::<f32>() < keep {
                scale
            } else {
                0.0
            };
        }
        skip(&mut self.rng, after);
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
