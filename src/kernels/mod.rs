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
