//! bnlab: Batch Normalization (Ioffe & Szegedy 2015, arXiv 1502.03167) on CPU.
//!
//! The data path reads top to bottom, one module per arrow:
//! `data` -> `nn` (layers built on `kernels`) -> `network` (loss) -> `optim` -> `train`
//! (steps, evaluation, Algorithm 2, probes) -> `report`; `probe` measures a network on one
//! mini-batch (internal covariate shift, the loss landscape). See ARCHITECTURE.md. Trained
//! networks leave through `checkpoint`, `fold` (BN folded into the Linear before it) and
//! `onnx` (export for other runtimes).

#![warn(missing_docs)]

pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod error;
pub mod experiments;
pub mod fold;
pub mod fsutil;
pub mod kernels;
pub mod model;
pub mod network;
pub mod nn;
pub mod onnx;
pub mod optim;
pub mod probe;
pub mod report;
pub mod run;
pub mod stop;
pub mod study;
pub mod train;
pub mod tune;

pub use error::{Error, Result};
