//! Kernels: plain functions over slices and shapes. No allocation, an explicit thread count.
//!
//! Each kernel that matters numerically has a slow, obviously-correct twin in f64 (`reference`
//! submodules) that the tests compare against.

/// Define a kernel function compiled twice: for AVX2 and FMA, chosen at run time when the CPU
/// has them (so the binary stays portable), and for the baseline target. Loops inside vectorize
/// eight lanes wide on the first. Results are identical either way: Rust never contracts
/// `a * b + c` into an FMA on its own.
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
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments, clippy::unused_unit)]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU features `avx2` is compiled for were just detected.
                    return unsafe { avx2($($arg),*) };
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
pub mod sparse;
pub mod team;

pub use team::{join, par_for, par_ranges, part, pieces, Disjoint, MAX_THREADS};
