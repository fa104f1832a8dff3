//! Kernels: plain functions over slices and shapes. No allocation, an explicit thread count.
//!
//! Each kernel that matters numerically has a slow, obviously-correct twin in f64 (`reference`
//! submodules) that the tests compare against.

pub mod activation;
pub mod batch_norm;
pub mod matmul;
