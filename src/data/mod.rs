//! Data sets: reading IDX files, holding MNIST-layout image sets in memory, turning them into
//! float mini-batches, and fetching them (checksum-verified) when they are not on disk.
//!
//! - [`idx`]: the IDX file format, raw or gzipped.
//! - [`mnist`]: [`Dataset`] / [`Split`], loading a directory, choosing the data directory.
//! - [`download`]: mirrors, SHA-256 verification, atomic writes.

pub mod download;
pub mod idx;
pub mod mnist;

pub use download::{download_files, sha256_hex, MNIST_MIRRORS, MNIST_SHA256};
pub use idx::{parse_idx, read_idx, write_idx, Idx};
pub use mnist::{
    fashion_mnist, load_idx_dir, load_mnist_dir, load_pair, mnist, mnist_from, resolve_data_dir,
    resolve_data_dir_with, Dataset, Split, FASHION_SYSTEM_DIR, MNIST_CLASSES, MNIST_FILES,
};
