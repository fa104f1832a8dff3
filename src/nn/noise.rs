//! "Noisy BN" (Santurkar, Tsipras, Ilyas and Madry, "How Does Batch Normalization Help
//! Optimization?", NeurIPS 2018, section 2.1 and Figure 2): time-varying noise with a non-zero
//! mean and a non-unit scale added after a batch-normalization layer, so that the distribution
//! of the next layer's inputs shifts at every step, more than it would without BN at all.
//!
//! In training, at every forward pass (every step) the layer draws a shift `mu_t ~ U(-mean_range,
//! mean_range)` and a scale `sigma_t ~ U(scale_low, scale_high)`; then for every value of the
//! batch `m ~ U(mu_t - jitter, mu_t + jitter)` and `s ~ N(sigma_t, scale_std^2)`, and the output is
//! `s * a + m`. The defaults are Santurkar et al.'s: 0.5, 1 to 1.25, 0.1, 0.1. The gradient is
//! `dx = s * dy` (the noise is not a parameter). At inference and in Algorithm 2's pass the layer
//! is the identity.
//!
//! In a data-parallel run (`set_dist`) every rank draws the noise of the whole global batch
//! (up to the end of its slice) from the same stream and keeps its slice's values, as dropout
//! does: P ranks add exactly the noise one process adds, and the generators stay identical.

use super::{backward_nothing, check_forward, Ctx, Layer, Mode};
use crate::dist::Dist;
use crate::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The distributions of "noisy BN", see the module doc.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NoiseSpec {
    /// The per-step shift `mu_t` is uniform on `[-mean_range, mean_range]`.
    pub mean_range: f64,
    /// Each value's shift is uniform on `[mu_t - mean_jitter, mu_t + mean_jitter]`.
    pub mean_jitter: f64,
    /// The per-step scale `sigma_t` is uniform on `[scale_low, scale_high]`.
    pub scale_low: f64,
    /// See `scale_low`.
    pub scale_high: f64,
    /// Each value's scale is normal with mean `sigma_t` and this standard deviation.
    pub scale_std: f64,
}

impl Default for NoiseSpec {
    /// Santurkar et al.'s noise.
    fn default() -> Self {
        NoiseSpec {
            mean_range: 0.5,
            mean_jitter: 0.1,
            scale_low: 1.0,
            scale_high: 1.25,
            scale_std: 0.1,
        }
    }
}

impl NoiseSpec {
    /// `None` if every setting is finite, non-negative and `scale_low <= scale_high`; else what
    /// is wrong.
    pub fn problem(&self) -> Option<String> {
        let all = [
            ("mean_range", self.mean_range),
            ("mean_jitter", self.mean_jitter),
            ("scale_low", self.scale_low),
            ("scale_high", self.scale_high),
            ("scale_std", self.scale_std),
        ];
        for (name, v) in all {
            if !(v.is_finite() && v >= 0.0) {
                return Some(format!("'{name}' must be a finite number >= 0, found {v}"));
            }
        }
        (self.scale_low > self.scale_high).then(|| {
            format!(
                "'scale_low' ({}) is above 'scale_high' ({})",
                self.scale_low, self.scale_high
            )
        })
    }
}

/// Noisy BN's noise on `size` values per example (see the module doc).
///
/// Works without `reserve` (the scale buffer is sized by the first training-mode forward pass of
/// a larger batch). `backward` before any forward pass, or with another batch size than the last
/// forward's, fills `dx` with zeros.
pub struct Noise {
    size: usize,
    /// The distributions.
    pub spec: NoiseSpec,
    rng: ChaCha8Rng,
    /// Each value's scale `s` in the last training pass.
    scale: Vec<f32>,
    /// `(mu_t, sigma_t)` of the last training pass.
    last_draw: (f64, f64),
    last_train: bool,
    /// The batch size of the last successful forward pass (0: none).
    last_n: usize,
    /// The data-parallel run this layer is a replica in (`set_dist`), if any.
    dist: Option<Dist>,
}

impl Noise {
    /// Noise on `size` values per example, drawn from a generator seeded with `seed`.
    pub fn new(size: usize, spec: NoiseSpec, seed: u64) -> Self {
        Noise {
            size,
            spec,
            rng: ChaCha8Rng::seed_from_u64(seed),
            scale: Vec::new(),
            last_draw: (0.0, 1.0),
            last_train: false,
            last_n: 0,
            dist: None,
        }
    }

    /// Make this layer one replica of a data-parallel run (`None`: a layer of its own): see
    /// the module doc.
    pub fn set_dist(&mut self, dist: Option<Dist>) {
        self.dist = dist;
    }

    /// `(mu_t, sigma_t)` of the last training-mode forward pass.
    pub fn last_draw(&self) -> (f64, f64) {
        self.last_draw
    }

    /// Uniform on `[lo, hi]` (exactly `lo` when they are equal).
    fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * rng.gen::<f64>()
    }
}

impl Layer for Noise {
    fn in_size(&self) -> usize {
        self.size
    }
    fn out_size(&self) -> usize {
        self.size
    }
    fn reserve(&mut self, max_batch: usize) {
        let len = max_batch * self.size;
        if self.scale.len() < len {
            self.scale.resize(len, 0.0);
        }
    }
    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        check_forward(self, x, y, n)?;
        self.last_n = n;
        let len = n * self.size;
        self.last_train = ctx.mode == Mode::Train;
        if !self.last_train {
            y[..len].copy_from_slice(&x[..len]);
            return Ok(());
        }
        let (before, _) = super::dropout::draws_around(self.dist.as_ref(), n);
        self.reserve(n);
        let sp = self.spec;
        let mu = Self::uniform(&mut self.rng, -sp.mean_range, sp.mean_range);
        let sigma = Self::uniform(&mut self.rng, sp.scale_low, sp.scale_high);
        self.last_draw = (mu, sigma);
        // The per-value draws come from a fast generator seeded by this layer's ChaCha stream
        // once per pass, so the pass costs a few nanoseconds per value and the ChaCha state
        // (saved in checkpoints) still decides everything.
        let mut fast = SplitMix64(self.rng.gen());
        let (lo, width) = ((mu - sp.mean_jitter) as f32, (2.0 * sp.mean_jitter) as f32);
        let (sigma, sd) = (sigma as f32, sp.scale_std as f32);
        let (x, y, scale) = (&x[..len], &mut y[..len], &mut self.scale[..len]);
        // Value `i` of the global batch is this pass's `i - first` (the values before `first`,
        // the other ranks', are drawn and dropped; one process: `first = 0`).
        let first = before * self.size;
        let end = first + len;
        let mut i = 0;
        while i < end {
            let (z0, z1) = fast.normal_pair();
            for z in [z0, z1] {
                if i < end {
                    let m = lo + width * fast.unit();
                    if i >= first {
                        let j = i - first;
                        let s = sigma + sd * z;
                        scale[j] = s;
                        y[j] = s * x[j] + m;
                    }
                    i += 1;
                }
            }
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
            for ((o, &g), &s) in dx[..len].iter_mut().zip(&dy[..len]).zip(&self.scale[..len]) {
                *o = g * s;
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
        let s = self.spec;
        format!(
            "Noise(mu_t~U(-{0},{0}), m~U(mu_t±{1}), sigma_t~U({2},{3}), s~N(sigma_t,{4}²))",
            s.mean_range, s.mean_jitter, s.scale_low, s.scale_high, s.scale_std
        )
    }
}

/// SplitMix64 (Steele, Lea and Flood 2014): a fast generator for the per-value draws.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform on `[0, 1)`, 24 bits.
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// Two independent standard normal values (Marsaglia's polar method).
    fn normal_pair(&mut self) -> (f32, f32) {
        loop {
            let r = self.next();
            // Two 31-bit uniforms on (-1, 1).
            let u = ((r >> 33) as f64 / (1u64 << 30) as f64 - 1.0) as f32;
            let v = ((r & 0x7FFF_FFFF) as f64 / (1u64 << 30) as f64 - 1.0) as f32;
            let q = u * u + v * v;
            if q > 0.0 && q < 1.0 {
                let f = (-2.0 * q.ln() / q).sqrt();
                return (u * f, v * f);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn train() -> Ctx {
        Ctx {
            mode: Mode::Train,
            threads: 1,
        }
    }

    /// The values follow the stated distributions: per pass one (mu_t, sigma_t) in range, each
    /// value's shift within mu_t ± jitter, the scales' mean and spread those of N(sigma_t, 0.1²).
    #[test]
    fn draws_follow_the_distributions() {
        let (n, size) = (200, 50);
        let mut layer = Noise::new(size, NoiseSpec::default(), 7);
        let zeros = vec![0.0f32; n * size];
        let ones = vec![1.0f32; n * size];
        let mut y0 = vec![0.0; n * size];
        let mut y1 = vec![0.0; n * size];
        let mut mus = Vec::new();
        for _ in 0..20 {
            // With the generator put back, x = 0 shows the shifts and x = 1 shows s + m.
            let mut saved = None;
            layer.for_each_rng(&mut |r| saved = Some(r.clone()));
            layer.forward(train(), &zeros, &mut y0, n).unwrap();
            let (mu, sigma) = layer.last_draw();
            let saved = saved.unwrap();
            layer.for_each_rng(&mut |r| *r = saved.clone());
            layer.forward(train(), &ones, &mut y1, n).unwrap();
            assert_eq!(layer.last_draw(), (mu, sigma));
            assert!((-0.5..=0.5).contains(&mu) && (1.0..=1.25).contains(&sigma));
            mus.push(mu);
            for &m in &y0 {
                assert!(
                    (m as f64 - mu).abs() <= 0.1 + 1e-6,
                    "shift {m} vs mu_t {mu}"
                );
            }
            let s: Vec<f64> = y1.iter().zip(&y0).map(|(&a, &b)| (a - b) as f64).collect();
            let mean = s.iter().sum::<f64>() / s.len() as f64;
            let sd = (s.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / s.len() as f64).sqrt();
            assert!(
                (mean - sigma).abs() < 0.01,
                "scale mean {mean} vs sigma_t {sigma}"
            );
            assert!((sd - 0.1).abs() < 0.01, "scale sd {sd}");
            // Each value's shift: uniform on mu_t ± 0.1, so its sd is 0.2 / sqrt(12).
            let msd =
                (y0.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / y0.len() as f64).sqrt();
            assert!((msd - 0.2 / 12f64.sqrt()).abs() < 0.005, "shift sd {msd}");
        }
        // mu_t changes from step to step.
        let z: Vec<f32> = {
            let mut g = SplitMix64(9);
            (0..50_000)
                .flat_map(|_| {
                    let (a, b) = g.normal_pair();
                    [a, b]
                })
                .collect()
        };
        let zm = z.iter().map(|&v| v as f64).sum::<f64>() / z.len() as f64;
        let zv = z.iter().map(|&v| (v as f64 - zm).powi(2)).sum::<f64>() / z.len() as f64;
        let within = z.iter().filter(|v| v.abs() < 1.0).count() as f64 / z.len() as f64;
        assert!(
            zm.abs() < 0.01 && (zv - 1.0).abs() < 0.02,
            "normal: mean {zm}, var {zv}"
        );
        assert!(
            (within - 0.6827).abs() < 0.01,
            "normal: P(|z| < 1) = {within}"
        );
        mus.dedup();
        assert_eq!(mus.len(), 20);
    }

    /// dx = s * dy, checked against a finite difference of a linear functional (exact for this
    /// affine map up to rounding).
    #[test]
    fn backward_is_the_scale() {
        let (n, size) = (3, 4);
        let mut layer = Noise::new(size, NoiseSpec::default(), 3);
        let x: Vec<f32> = (0..n * size).map(|i| i as f32 * 0.3 - 1.0).collect();
        let w: Vec<f32> = (0..n * size).map(|i| (i as f32 * 0.7).sin()).collect();
        let mut y = vec![0.0; n * size];
        let mut saved = None;
        layer.for_each_rng(&mut |r| saved = Some(r.clone()));
        let saved = saved.unwrap();
        layer.forward(train(), &x, &mut y, n).unwrap();
        let mut dx = vec![0.0; n * size];
        layer.backward(train(), &x, &y, &w, Some(&mut dx), n);
        let f = |layer: &mut Noise, x: &[f32]| -> f64 {
            layer.for_each_rng(&mut |r| *r = saved.clone());
            let mut y = vec![0.0; n * size];
            layer.forward(train(), x, &mut y, n).unwrap();
            y.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        for i in 0..n * size {
            let h = 0.25f32;
            let mut xp = x.clone();
            xp[i] += h;
            let mut xm = x.clone();
            xm[i] -= h;
            let fd = (f(&mut layer, &xp) - f(&mut layer, &xm)) / (2.0 * h as f64);
            assert!((fd - dx[i] as f64).abs() < 1e-5, "{i}: {fd} vs {}", dx[i]);
        }
    }

    /// Inference and Algorithm 2's pass: the identity, and the generator is not used.
    #[test]
    fn identity_outside_training() {
        let mut layer = Noise::new(2, NoiseSpec::default(), 1);
        let x = [1.0f32, -2.0, 3.0, 0.5];
        for mode in [Mode::Eval, Mode::Population] {
            let mut y = [0.0f32; 4];
            layer
                .forward(Ctx { mode, threads: 1 }, &x, &mut y, 2)
                .unwrap();
            assert_eq!(y, x);
            let mut dx = [0.0f32; 4];
            layer.backward(Ctx { mode, threads: 1 }, &x, &y, &x, Some(&mut dx), 2);
            assert_eq!(dx, x);
        }
        let mut fresh = ChaCha8Rng::seed_from_u64(1);
        layer.for_each_rng(&mut |r| assert_eq!(r.gen::<u64>(), fresh.gen::<u64>()));
    }

    #[test]
    fn settings_are_checked() {
        assert!(NoiseSpec::default().problem().is_none());
        let bad = NoiseSpec {
            scale_low: 2.0,
            ..NoiseSpec::default()
        };
        assert!(bad.problem().unwrap().contains("scale_low"));
        let nan = NoiseSpec {
            scale_std: f64::NAN,
            ..NoiseSpec::default()
        };
        assert!(nan.problem().unwrap().contains("scale_std"));
    }
}
