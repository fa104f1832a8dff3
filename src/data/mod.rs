//! Data sets: reading them from disk (IDX, CIFAR-10 binary, NumPy `.npz`), holding them in
//! memory, turning them into normalized float mini-batches, augmenting batches, and fetching
//! MNIST and CIFAR-10 (checksum-verified) when they are not on disk.
//!
//! - [`idx`]: the IDX file format, raw or gzipped.
//! - [`dataset`]: [`Dataset`] (images of shape C x H x W as bytes or floats, labels) and
//!   [`Split`]; batch filling with optional per-channel normalization.
//! - [`normalize`]: [`Normalization`], the `--normalize` flag, [`channel_stats`].
//! - [`augment`]: the `crop-flip` augmentation ([`CropFlip`]).
//! - [`mnist`](mod@mnist): directories in the MNIST layout (MNIST, Fashion-MNIST), the data directory.
//! - [`cifar`]: CIFAR-10's binary version, and its download.
//! - [`npz`]: NumPy `.npz` archives in Keras's `mnist.npz` layout.
//! - [`source`]: choosing the data set from `--data` / `--dataset` ([`resolve_source`]).
//! - [`download`]: mirrors, SHA-256 verification, atomic writes.
//!
//! Nothing here panics on file contents: every malformed input is an [`crate::Error`] naming
//! the file and the problem.

#![warn(missing_docs)]

pub mod augment;
pub mod cifar;
pub mod dataset;
pub mod download;
pub mod idx;
pub mod mnist;
pub mod normalize;
pub mod npz;
pub mod source;

pub use augment::{crop_flip, crop_flip_one, draw_crop, CropDraw, CropFlip};
pub use cifar::{
    cifar10, cifar10_from, cifar10_url, download_cifar10, load_cifar10_dir, parse_cifar10_batch,
    CIFAR10_CLASSES, CIFAR10_FILES, CIFAR10_SHA256, CIFAR10_URL_ENV,
};
pub use dataset::{Dataset, Pixels, Split};
pub use download::{download_files, sha256_hex, DOWNLOADS, MNIST_MIRRORS, MNIST_SHA256};
pub use idx::{parse_idx, read_idx, write_idx, Idx};
pub use mnist::{
    fashion_mnist, load_idx_dir, load_mnist_dir, load_pair, mnist, mnist_from, resolve_data_dir,
    resolve_data_dir_with, FASHION_SYSTEM_DIR, MNIST_CLASSES, MNIST_FILES,
};
pub use normalize::{
    channel_stats, parse_normalize_flag, Normalization, NormalizeFlag, NORMALIZE_FLAG,
};
pub use npz::{load_npz, parse_npz};
pub use source::{
    detect_source, resolve_source, resolve_source_with, DataSource, DatasetName, SourceSettings,
};
