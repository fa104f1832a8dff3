//! Kernels: plain functions over slices and shapes. No allocation, an explicit thread count.
//!
//! Each kernel that matters numerically has a slow, obviously-correct twin in f64 (`reference`
//! submodules) that the tests compare against.

/// Define a kernel function compiled three times: for AVX-512 (F, VL, BW, DQ, with AVX2 and
/// FMA), for AVX2 and FMA, and for the baseline target, dispatching on
/// [`simd::level`](crate::kernels::simd::level) (chosen
/// once at run time from what the CPU has and `BNLAB_SIMD`, so the binary stays portable).
/// Loops inside vectorize sixteen or eight lanes wide on the first two. Results are identical
/// at every level: Rust never contracts `a * b + c` into an FMA on its own.
#[macro_export]
#[doc(hidden)]
macro_rules! simd_kernel {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $body:block) => {
        $crate::simd_kernel! { $(#[$meta])* $vis fn $name($($arg: $ty),*) -> () $body }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments, clippy::unused_unit)]
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            #[allow(clippy::too_many_arguments, clippy::unused_unit)]
            fn imp($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
                #[allow(clippy::too_many_arguments, clippy::unused_unit)]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments, clippy::unused_unit)]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                match $crate::kernels::simd::level() {
                    // SAFETY: `simd::level` never returns a level whose CPU features were not
                    // detected.
                    $crate::kernels::simd::Level::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::kernels::simd::Level::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::kernels::simd::Level::Baseline => {}
                }
            }
            imp($($arg),*)
        }
    };
}

pub use simd_kernel;

pub mod activation;
pub mod batch_norm;
pub mod group_norm;
pub mod matmul;
pub mod simd;
pub mod sparse;
pub mod team;

pub use team::{join, par_for, par_ranges, part, pieces, Disjoint, MAX_THREADS};

/// Ask the CPU to start loading `run` into the cache (one hint per 64-byte line), for a loop
/// that will read it soon after the run it is on, where the hardware prefetcher cannot guess
/// the jump: a feature's runs in the convolutional layout lie `c * s` values apart. Only a
/// hint: it changes no value.
#[inline(always)]
pub fn prefetch(run: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in run.chunks(16) {
        // SAFETY: prefetching is a hint on a valid address; it reads nothing.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = run;
}

/// The sum of each run as f64, the values added one at a time in order starting from -0.0:
/// exactly what `run.iter().map(|&v| v as f64).sum::<f64>()` computes. Runs are taken four at
/// a time, so that four independent chains of adds hide the add latency (one chain waits
/// about three cycles per value). `out[i]` gets the sum of `runs[i * len..][..len]`.
#[allow(clippy::needless_range_loop)]
pub fn ordered_sums_f64(runs: &[f32], len: usize, out: &mut [f64]) {
    let count = out.len();
    debug_assert!(runs.len() >= count * len);
    let mut i = 0;
    while i + 4 <= count {
        let r: [&[f32]; 4] = std::array::from_fn(|k| &runs[(i + k) * len..][..len]);
        let mut s = [-0.0f64; 4];
        for p in 0..len {
            for k in 0..4 {
                s[k] += r[k][p] as f64;
            }
        }
        out[i..i + 4].copy_from_slice(&s);
        i += 4;
    }
    for (k, o) in out.iter_mut().enumerate().skip(i) {
        *o = runs[k * len..][..len]
            .iter()
            .fold(-0.0f64, |a, &v| a + v as f64);
    }
}

#[cfg(test)]
mod ordered_sums_tests {
    /// The same bits as `Iterator::sum`, for counts that do and do not fill groups of four,
    /// with values whose sum depends on the order (large and small magnitudes), and all
    /// negative zeros (whose sum keeps its sign only from a -0.0 start).
    #[test]
    fn the_bits_of_iterator_sum() {
        for count in [1usize, 3, 4, 5, 9] {
            for len in [1usize, 7, 49, 196] {
                let runs: Vec<f32> = (0..count * len)
                    .map(|i| {
                        let v = ((i * 7919) % 1013) as f32 - 506.0;
                        if i % 5 == 0 {
                            v * 1.0e7
                        } else {
                            v * 1.0e-3
                        }
                    })
                    .collect();
                let mut out = vec![0.0; count];
                super::ordered_sums_f64(&runs, len, &mut out);
                for (k, &o) in out.iter().enumerate() {
                    let want: f64 = runs[k * len..][..len].iter().map(|&v| v as f64).sum();
                    assert_eq!(
                        o.to_bits(),
                        want.to_bits(),
                        "count {count} len {len} run {k}"
                    );
                }
            }
        }
        let zeros = vec![-0.0f32; 5 * 3];
        let mut out = vec![0.0; 5];
        super::ordered_sums_f64(&zeros, 3, &mut out);
        assert!(out.iter().all(|v| v.to_bits() == (-0.0f64).to_bits()));
    }
}
