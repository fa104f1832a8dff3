//! Data-parallel training: P processes (ranks), each holding the whole network and taking a
//! contiguous slice of every mini-batch, with gradients summed over the ranks and, for
//! `BnSync::Global`, each BatchNorm's statistics reduced over them (SyncBatchNorm).
//!
//! The library only sees the [`Collective`] trait: the operations a step needs. `dist::mpi`
//! (the `mpi` cargo feature) implements it over MPI; the kernels and layers never depend on
//! MPI. A network without a collective (or with one of size 1) trains exactly as before.
//!
//! Batch statistics are merged as (count, mean, M2) triples with Chan, Golub and LeVeque's
//! parallel formula ([`merge_moments`]): the variance never comes from `E[x^2] - E[x]^2` nor
//! from `1/sqrt(var + eps)`, so the large-mean robustness of the single-process kernels
//! carries over (the means travel in f64, built from the kernels' two-f32 means).

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::{Error, Result};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The collective operations of a data-parallel step. Every rank calls them in the same order
/// with buffers of the same length; every rank gets the same result bits (the reductions are
/// commutative and [`merge_moments`] is symmetric in its two operands).
pub trait Collective: Send + Sync {
    /// This process's rank, `0..size()`.
    fn rank(&self) -> usize;
    /// The number of ranks P.
    fn size(&self) -> usize;
    /// Element-wise sum over the ranks, in place.
    fn sum_f64(&self, buf: &mut [f64]);
    /// Element-wise sum over the ranks, in place.
    fn sum_f32(&self, buf: &mut [f32]);
    /// Merge `(count, mean, M2)` triples (`buf.len()` a multiple of 3) over the ranks with
    /// [`merge_moments`], in place.
    fn merge_moments(&self, buf: &mut [f64]);
    /// The largest value over the ranks.
    fn max_u64(&self, v: u64) -> u64;
    /// The smallest value over the ranks.
    fn min_u64(&self, v: u64) -> u64;
    /// Wait for every rank.
    fn barrier(&self);
}

/// How BatchNorm statistics are computed in a data-parallel run (`--bn-sync`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BnSync {
    /// Statistics over the whole global mini-batch, reduced over the ranks: training equals
    /// one process with the whole batch (up to the order of additions).
    Global,
    /// Each rank normalizes its own slice: ghost batch normalization with virtual batches of
    /// the slice size. Running statistics are still averaged over the ranks.
    Local,
}

impl BnSync {
    /// Parse `global` or `local`.
    pub fn parse(s: &str) -> Result<BnSync> {
        match s {
            "global" => Ok(BnSync::Global),
            "local" => Ok(BnSync::Local),
            _ => Err(Error::config(
                "--bn-sync",
                format!("'{s}' (expected global or local)"),
            )),
        }
    }

    /// The flag's spelling.
    pub fn name(self) -> &'static str {
        match self {
            BnSync::Global => "global",
            BnSync::Local => "local",
        }
    }
}

/// A network's place in a data-parallel run: the collective, how BN synchronizes, and the
/// global batch of the pass in progress.
#[derive(Clone)]
pub struct Dist {
    /// The ranks' collective operations.
    pub comm: Arc<dyn Collective>,
    /// How BatchNorm statistics are computed.
    pub bn_sync: BnSync,
    /// The global batch of the pass in progress, shared by the network and its layers (the
    /// clones of one `Dist`): `Network` sets it before every pass (`set_batch`), and the
    /// layers that draw random numbers (dropout, noisy BN) or split the batch (ghost BN) read
    /// their rank's place in it (`pass`). 0: not set.
    batch: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Dist {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Dist {{ rank {} of {}, bn_sync {:?} }}",
            self.comm.rank(),
            self.comm.size(),
            self.bn_sync
        )
    }
}

impl Dist {
    /// `comm`'s ranks with BN synchronized as `bn_sync`.
    pub fn new(comm: Arc<dyn Collective>, bn_sync: BnSync) -> Dist {
        Dist {
            comm,
            bn_sync,
            batch: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// This rank's examples of a batch of `batch`: see [`slice_of`].
    pub fn slice(&self, batch: usize) -> std::ops::Range<usize> {
        slice_of(batch, self.comm.size(), self.comm.rank())
    }

    /// Say that the next passes are over this rank's slice of a global batch of `batch`
    /// examples (0: over a batch of this rank's own, such as an evaluation shard's).
    pub fn set_batch(&self, batch: usize) {
        self.batch.store(batch, Ordering::Relaxed);
    }

    /// For a pass over `n` examples on this rank: the global batch and this rank's slice of
    /// it, when a global batch was set (`set_batch`) and its slice holds `n` examples; `None`
    /// otherwise (the pass's batch is this rank's own).
    pub fn pass(&self, n: usize) -> Option<(usize, std::ops::Range<usize>)> {
        let b = self.batch.load(Ordering::Relaxed);
        let s = self.slice(b);
        (b > 0 && s.len() == n).then_some((b, s))
    }
}

/// Rank `r`'s contiguous slice of a batch of `batch` examples split over `p` ranks: the first
/// `batch % p` ranks take one example more (61 over 2: 31 and 30).
pub fn slice_of(batch: usize, p: usize, r: usize) -> std::ops::Range<usize> {
    let (q, extra) = (batch / p, batch % p);
    let start = r * q + r.min(extra);
    start..start + q + usize::from(r < extra)
}

/// Chan et al.'s pairwise merge of two sets' `(count, mean, M2)` (M2: the sum of squared
/// deviations from the set's mean), written so that swapping the operands gives the same bits
/// (MPI may apply a commutative operation in either order on different ranks):
/// `n = na + nb`, `mean = (na ma + nb mb) / n`, `M2 = (M2a + M2b) + delta^2 na nb / n` with
/// `delta = mb - ma`. An empty set leaves the other unchanged.
pub fn merge_moments(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    let ([na, ma, qa], [nb, mb, qb]) = (a, b);
    if na == 0.0 {
        return b;
    }
    if nb == 0.0 {
        return a;
    }
    let n = na + nb;
    let delta = mb - ma;
    [
        n,
        (na * ma + nb * mb) / n,
        (qa + qb) + delta * delta * (na * nb / n),
    ]
}

/// A collective of one process: every reduction is the identity. Lets code written for the
/// data-parallel path run (and be tested) in one process.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f64(&self, _: &mut [f64]) {}
    fn sum_f32(&self, _: &mut [f32]) {}
    fn merge_moments(&self, _: &mut [f64]) {}
    fn max_u64(&self, v: u64) -> u64 {
        v
    }
    fn min_u64(&self, v: u64) -> u64 {
        v
    }
    fn barrier(&self) {}
}

/// The ranks MPI's launcher says this process is one of, from the environment (Open MPI's
/// `OMPI_COMM_WORLD_SIZE`, MPICH's and PMIx's `PMI_SIZE`), without initializing MPI: `None`
/// when not started by a launcher.
pub fn launcher_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_the_batch() {
        for p in 1..6 {
            for b in p..40 {
                let mut next = 0;
                for r in 0..p {
                    let s = slice_of(b, p, r);
                    assert_eq!(s.start, next);
                    assert!(s.len() == b / p || s.len() == b / p + 1);
                    next = s.end;
                }
                assert_eq!(next, b);
            }
        }
        assert_eq!(slice_of(61, 2, 0), 0..31);
        assert_eq!(slice_of(61, 2, 1), 31..61);
    }

    /// Moments of a slice computed as the kernels do (two passes in f64).
    fn moments(x: &[f32]) -> [f64; 3] {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let m2 = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>();
        [n, mean, m2]
    }

    /// Merged moments equal those of the whole set, at a mean of 1e4 with a standard deviation
    /// of 1e-2 (where `E[x^2] - E[x]^2` in f64 keeps about two digits), for uneven pieces, and
    /// the merge is symmetric to the bit.
    #[test]
    fn chan_merge_matches_the_whole_set_at_large_means() {
        let x: Vec<f32> = (0..997)
            .map(|i| 1e4 + 1e-2 * (((i * 7919) % 1000) as f32 / 500.0 - 1.0))
            .collect();
        let whole = moments(&x);
        for cut in [1, 2, 300, 498, 996] {
            let (a, b) = (moments(&x[..cut]), moments(&x[cut..]));
            let m = merge_moments(a, b);
            assert_eq!(m, merge_moments(b, a), "symmetric");
            assert_eq!(m[0], whole[0]);
            assert!(
                (m[1] - whole[1]).abs() <= 1e-12 * whole[1].abs(),
                "{m:?} {whole:?}"
            );
            let rel = (m[2] - whole[2]).abs() / whole[2];
            assert!(
                rel < 1e-9,
                "cut {cut}: M2 {} against {}: {rel:e}",
                m[2],
                whole[2]
            );
        }
        // Three pieces in two orders: the same result up to rounding.
        let (a, b, c) = (
            moments(&x[..100]),
            moments(&x[100..700]),
            moments(&x[700..]),
        );
        let l = merge_moments(merge_moments(a, b), c);
        let r = merge_moments(a, merge_moments(b, c));
        assert!((l[2] - r[2]).abs() / l[2] < 1e-9);
        // The naive formula loses the variance here: this is what the merge avoids.
        let n = x.len() as f64;
        let s: f64 = x.iter().map(|&v| v as f64).sum();
        let s2: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum();
        let naive = s2 - s * s / n;
        assert!((naive - whole[2]).abs() / whole[2] > 1e-6);
        assert_eq!(merge_moments([0.0; 3], a), a);
    }
}
