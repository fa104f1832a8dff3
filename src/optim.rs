//! SGD with PyTorch's semantics and learning-rate schedules.
//!
//! For each parameter w with gradient g:  d = g + weight_decay * w;
//! v = d on the first step, then v = momentum * v + d;  w = w - lr * v.
//! (With momentum 0 this is w = w - lr * d.) Weight decay applies to every parameter, BN's gamma
//! and beta included, as `torch.optim.SGD(net.parameters(), ...)` does.

use crate::network::Network;
use crate::nn::Layer;
use crate::{Error, Result};
use std::sync::atomic::{AtomicBool, Ordering};

/// How the learning rate changes with the step (0-based), from the base rate `lr`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    /// lr at every step.
    Constant,
    /// lr * gamma^(floor(step / every))
    Step {
        /// Steps between changes.
        every: usize,
        /// The factor at each change.
        gamma: f64,
    },
    /// lr * gamma^(step / every), decaying smoothly
    Exponential {
        /// Steps over which the rate falls by `gamma`.
        every: usize,
        /// The factor per `every` steps.
        gamma: f64,
    },
}

impl Schedule {
    /// The learning rate for 0-based step `step`.
    pub fn lr(&self, base: f64, step: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((step / every.max(1)) as i32),
            Schedule::Exponential { every, gamma } => {
                base * gamma.powf(step as f64 / every.max(1) as f64)
            }
        }
    }

    /// Parse `constant`, `step:EVERY:GAMMA` or `exp:EVERY:GAMMA`.
    pub fn parse(s: &str) -> Result<Schedule> {
        let bad = || {
            Error::config(
                "--schedule",
                format!("'{s}' (expected constant, step:EVERY:GAMMA or exp:EVERY:GAMMA)"),
            )
        };
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            ["constant"] => Ok(Schedule::Constant),
            [kind @ ("step" | "exp"), every, gamma] => {
                let every: usize = every.parse().map_err(|_| bad())?;
                let gamma: f64 = gamma.parse().map_err(|_| bad())?;
                if every == 0 || !gamma.is_finite() || gamma <= 0.0 {
                    return Err(bad());
                }
                Ok(if *kind == "step" {
                    Schedule::Step { every, gamma }
                } else {
                    Schedule::Exponential { every, gamma }
                })
            }
            _ => Err(bad()),
        }
    }
}

// The updates also report whether every new weight is finite: a NaN or infinity has all
// exponent bits set. An integer OR of that test vectorizes (a float sum would not: floats may
// not be reassociated), so the check costs next to nothing in a loop bound by memory.
crate::kernels::simd_kernel! {
    fn update_plain(w: &mut [f32], g: &[f32], lr: f32, wd: f32) -> bool {
        let mut bad = 0u32;
        for (wv, &gv) in w.iter_mut().zip(g) {
            let d = gv + wd * *wv;
            *wv -= lr * d;
            bad |= ((wv.to_bits() >> 23) & 0xff == 0xff) as u32;
        }
        bad == 0
    }
}

crate::kernels::simd_kernel! {
    fn update_momentum(
        w: &mut [f32],
        g: &[f32],
        v: &mut [f32],
        lr: f32,
        wd: f32,
        mom: f32,
        first: bool,
    ) -> bool {
        let mut bad = 0u32;
        for ((wv, &gv), vv) in w.iter_mut().zip(g).zip(v.iter_mut()) {
            let d = gv + wd * *wv;
            *vv = if first { d } else { mom * *vv + d };
            *wv -= lr * *vv;
            bad |= ((wv.to_bits() >> 23) & 0xff == 0xff) as u32;
        }
        bad == 0
    }
}

/// Stochastic gradient descent as `torch.optim.SGD` (see the module doc), with its momentum
/// buffers.
pub struct Sgd {
    /// The base learning rate, before the schedule.
    pub lr: f64,
    /// Momentum in `[0, 1)`; 0 for plain SGD.
    pub momentum: f32,
    /// L2 weight decay added to every gradient (`weight_decay * w`).
    pub weight_decay: f32,
    /// How the rate changes with the step.
    pub schedule: Schedule,
    velocity: Vec<Vec<f32>>,
    /// Updates applied so far (the schedule's step).
    pub steps_taken: usize,
    /// The tensors of the step being taken (kept to reuse the list's storage).
    params: Vec<Param>,
}

/// One parameter tensor during an update: its weights, gradient and momentum buffer (null
/// without momentum), `len` values each.
struct Param {
    w: *mut f32,
    g: *const f32,
    v: *mut f32,
    len: usize,
}

// SAFETY: a `Param` only lives inside `Sgd::step_with`, which shares it with the pieces of one
// region; each piece touches its own part of each tensor. Between steps the list is empty.
unsafe impl Send for Param {}
unsafe impl Sync for Param {}

impl Sgd {
    /// SGD with these settings; the momentum buffers are created by the first step.
    pub fn new(lr: f64, momentum: f32, weight_decay: f32, schedule: Schedule) -> Self {
        Sgd {
            lr,
            momentum,
            weight_decay,
            schedule,
            velocity: Vec::new(),
            steps_taken: 0,
            params: Vec::new(),
        }
    }

    /// Apply one update with the gradients the last backward pass left in the network.
    /// Returns false when some weight became NaN or infinite.
    pub fn step(&mut self, net: &mut Network) -> bool {
        self.step_with(net, None)
    }

    /// [`Sgd::step`] with the gradients taken from `grads` when given: every parameter's, one
    /// after another in `for_each_param` order (a data-parallel run's gradients summed over
    /// its ranks).
    pub fn step_with(&mut self, net: &mut Network, grads: Option<&[f32]>) -> bool {
        let lr = self.schedule.lr(self.lr, self.steps_taken) as f32;
        let (mom, wd) = (self.momentum, self.weight_decay);
        let first = self.steps_taken == 0;
        if mom != 0.0 && self.velocity.is_empty() {
            // Sized once, on the first step.
            net.body
                .for_each_param(&mut |w, _| self.velocity.push(vec![0.0; w.len()]));
        }
        // The tensors, gathered once per step into a list sized on the first step; then one
        // region in which piece `t` of `threads` updates the `t`-th part of every tensor. Each
        // weight's update depends on that weight alone, so any split gives the same values.
        // The parts follow the input layer's feature blocks (its weight's first and second
        // halves on two threads), and piece 0 runs on the thread that computed the first
        // block's gradient, so those weights stay in that core's cache.
        let threads = net.threads.max(1);
        let params = &mut self.params;
        params.clear();
        let mut at = 0;
        let mut idx = 0;
        let velocity = &mut self.velocity;
        net.body.for_each_param(&mut |w, g| {
            let g = match grads {
                Some(all) => {
                    at += w.len();
                    &all[at - w.len()..at]
                }
                None => g,
            };
            assert_eq!(w.len(), g.len(), "a gradient for every weight");
            let v = if mom == 0.0 {
                std::ptr::null_mut()
            } else {
                assert_eq!(velocity[idx].len(), w.len(), "a velocity for every weight");
                velocity[idx].as_mut_ptr()
            };
            params.push(Param {
                w: w.as_mut_ptr(),
                g: g.as_ptr(),
                v,
                len: w.len(),
            });
            idx += 1;
        });
        let params = &self.params;
        let finite = AtomicBool::new(true);
        crate::kernels::par_for(threads, threads, |t| {
            let mut ok = true;
            for p in params {
                let r = crate::kernels::part(p.len, threads, t);
                // SAFETY: the pointers come from the slices borrowed above, which outlive the
                // region; piece `t` alone touches elements `r` of each (the parts of one tensor
                // are disjoint), and a tensor's weights, gradient and velocity do not overlap.
                let (w, g) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(p.w.add(r.start), r.len()),
                        std::slice::from_raw_parts(p.g.add(r.start), r.len()),
                    )
                };
                ok &= if p.v.is_null() {
                    update_plain(w, g, lr, wd)
                } else {
                    // SAFETY: as above.
                    let v = unsafe { std::slice::from_raw_parts_mut(p.v.add(r.start), r.len()) };
                    update_momentum(w, g, v, lr, wd, mom, first)
                };
            }
            if !ok {
                finite.store(false, Ordering::Relaxed);
            }
        });
        self.params.clear();
        let finite = finite.into_inner();
        self.steps_taken += 1;
        finite
    }

    /// The momentum buffers, one per parameter in `state_dict` order (empty before the first
    /// step or without momentum), for checkpoints.
    pub fn velocity(&self) -> &[Vec<f32>] {
        &self.velocity
    }

    /// The momentum buffers, to restore a saved run.
    pub fn velocity_mut(&mut self) -> &mut Vec<Vec<f32>> {
        &mut self.velocity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        assert_eq!(Schedule::Constant.lr(0.1, 12345), 0.1);
        let s = Schedule::parse("step:100:0.5").unwrap();
        assert_eq!(s.lr(1.0, 99), 1.0);
        assert_eq!(s.lr(1.0, 100), 0.5);
        assert_eq!(s.lr(1.0, 250), 0.25);
        let e = Schedule::parse("exp:100:0.5").unwrap();
        assert!((e.lr(1.0, 50) - 0.5f64.sqrt()).abs() < 1e-12);
        assert!((e.lr(2.0, 200) - 0.5).abs() < 1e-12);
        for bad in ["cosine", "step:0:0.5", "exp:10:-1", "step:10", "exp:a:0.5"] {
            assert!(Schedule::parse(bad).is_err(), "{bad}");
        }
    }
}
