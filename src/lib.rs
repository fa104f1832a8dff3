//! bnlab: Batch Normalization (Ioffe & Szegedy 2015, arXiv 1502.03167) on CPU.
//!
//! The data path reads top to bottom, one module per arrow:
//! `data` -> `nn` (layers built on `kernels`) -> `train` (loss, `optim`) -> `probes` -> `report`.
//! See ARCHITECTURE.md.

pub mod data;
pub mod error;
pub mod report;

pub use error::{Error, Result};
