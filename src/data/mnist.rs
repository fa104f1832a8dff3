//! In-memory image-classification data sets in the MNIST layout: a directory holding
//! `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
//! `t10k-labels-idx1-ubyte`, each optionally gzipped. MNIST and Fashion-MNIST share this layout,
//! so nothing here is specific to digits beyond the default directory name and class count.
//!
//! Images stay as bytes (60,000 x 784 bytes = 47 MB for MNIST, one channel) and are turned into
//! `f32` only one mini-batch at a time by [`Dataset::fill_batch`], which keeps memory at a quarter
//! of an all-float copy and lets the training loop reuse one batch buffer.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

pub use super::dataset::{Dataset, Pixels, Split};
use super::download::{download_files, fetch_hint, DOWNLOADS, MNIST_MIRRORS, MNIST_SHA256};
use super::idx::read_idx;
use crate::error::{Error, Result};

/// File names (without `.gz`) of a data set in the MNIST layout: training images and labels,
/// then test images and labels.
pub const MNIST_FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];

/// Number of classes in MNIST (and Fashion-MNIST).
pub const MNIST_CLASSES: usize = 10;

/// Environment variable naming the directory that holds one sub-directory per data set.
pub const DATA_ENV: &str = "BNLAB_DATA";

/// Environment variable overriding the MNIST download mirrors with one base URL.
pub const MIRROR_ENV: &str = "BNLAB_MNIST_MIRROR";

/// Loads an image file (3-D IDX) and its label file (1-D IDX) and checks that they belong
/// together and that every label is below `classes` (at most 256). The images get one channel.
pub fn load_pair(images: &Path, labels: &Path, classes: usize) -> Result<Dataset> {
    let img = read_idx(images, 3)?;
    let lab = read_idx(labels, 1)?;
    let (n_img, rows, cols) = (img.dims[0], img.dims[1], img.dims[2]);
    let n_lab = lab.dims[0];
    if classes == 0 || classes > 256 {
        return Err(Error::config(
            "classes",
            format!("{classes} (labels are bytes: 1..=256 classes)"),
        ));
    }
    if n_img != n_lab {
        return Err(Error::data(
            images,
            format!(
                "count mismatch: {n_img} images but {} has {n_lab} labels",
                labels.display()
            ),
        ));
    }
    if let Some((i, &v)) = lab
        .data
        .iter()
        .enumerate()
        .find(|&(_, &v)| v as usize >= classes)
    {
        return Err(Error::data(
            labels,
            format!("label out of range: label at index {i} is {v}, expected 0..{classes}"),
        ));
    }
    Ok(Dataset::from_validated(
        Pixels::U8(img.data),
        lab.data,
        [1, rows, cols],
        classes,
    ))
}

/// The path of `name` in `dir`, preferring `name.gz` over `name`; `None` if neither exists.
pub fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let gz = dir.join(format!("{name}.gz"));
    if gz.is_file() {
        return Some(gz);
    }
    let raw = dir.join(name);
    raw.is_file().then_some(raw)
}

/// The names among `names` that exist in `dir` neither gzipped nor raw.
pub fn missing_files<'a>(dir: &Path, names: &[&'a str]) -> Vec<&'a str> {
    names
        .iter()
        .copied()
        .filter(|n| find_file(dir, n).is_none())
        .collect()
}

/// Loads a directory in the MNIST layout with `classes` classes.
pub fn load_idx_dir(dir: &Path, classes: usize) -> Result<Split> {
    let missing = missing_files(dir, &MNIST_FILES);
    if !missing.is_empty() {
        let expected: Vec<String> = missing
            .iter()
            .map(|n| {
                format!(
                    "{} (or {})",
                    dir.join(format!("{n}.gz")).display(),
                    dir.join(n).display()
                )
            })
            .collect();
        return Err(Error::data(
            dir,
            format!(
                "missing data file(s): {}; pass `--data DIR` for a directory that holds them, {}",
                expected.join(", "),
                fetch_hint()
            ),
        ));
    }
    let path = |n: &str| find_file(dir, n).unwrap_or_else(|| dir.join(n));
    let [tri, trl, tei, tel] = MNIST_FILES.map(path);
    // Decompressing the training images dominates loading; doing the test set on a second
    // thread at the same time hides most of the rest.
    let (train, test) = std::thread::scope(|s| {
        let test = s.spawn(|| load_pair(&tei, &tel, classes));
        let train = load_pair(&tri, &trl, classes);
        let test = test.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (train, test)
    });
    let (train, test) = (train?, test?);
    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(Error::data(
            &tei,
            format!(
                "test images are {}x{} but training images ({}) are {}x{}",
                test.rows,
                test.cols,
                tri.display(),
                train.rows,
                train.cols
            ),
        ));
    }
    Ok(Split { train, test })
}

/// Loads MNIST (10 classes) from `dir`.
pub fn load_mnist_dir(dir: &Path) -> Result<Split> {
    load_idx_dir(dir, MNIST_CLASSES)
}

/// The directory of data set `name`: `--data DIR` if given, else `$BNLAB_DATA/<name>`, else
/// `./data/<name>`.
pub fn resolve_data_dir(flag: Option<&Path>, name: &str) -> PathBuf {
    resolve_data_dir_with(flag, std::env::var_os(DATA_ENV), name)
}

/// [`resolve_data_dir`] with the value of `BNLAB_DATA` passed in, so the precedence can be
/// tested without mutating the process environment. An empty value counts as unset.
pub fn resolve_data_dir_with(flag: Option<&Path>, env: Option<OsString>, name: &str) -> PathBuf {
    match (flag, env) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(root)) if !root.is_empty() => PathBuf::from(root).join(name),
        _ => Path::new("data").join(name),
    }
}

/// MNIST from `--data DIR` / `$BNLAB_DATA/mnist` / `./data/mnist`; if files are missing and
/// `download` is set, fetches them first from `$BNLAB_MNIST_MIRROR` or else [`MNIST_MIRRORS`].
pub fn mnist(flag: Option<&Path>, download: bool) -> Result<Split> {
    let dir = resolve_data_dir(flag, "mnist");
    let mirror = std::env::var(MIRROR_ENV).ok().filter(|m| !m.is_empty());
    let mirrors: Vec<&str> = match &mirror {
        Some(m) => vec![m.as_str()],
        None => MNIST_MIRRORS.to_vec(),
    };
    mnist_from(&dir, download, &mirrors)
}

/// Where Debian's `dataset-fashion-mnist` package puts the four IDX files.
pub const FASHION_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// Fashion-MNIST (the same IDX layout and file names as MNIST): from `--data DIR`, else
/// `$BNLAB_DATA/fashion-mnist`, else Debian's `/usr/share/datasets/fashion-mnist`
/// (`apt-get install dataset-fashion-mnist`). Never downloaded.
pub fn fashion_mnist(flag: Option<&Path>) -> Result<Split> {
    let dir = match (flag, std::env::var_os(DATA_ENV).filter(|v| !v.is_empty())) {
        (Some(d), _) => d.to_path_buf(),
        (None, Some(base)) => PathBuf::from(base).join("fashion-mnist"),
        (None, None) => PathBuf::from(FASHION_SYSTEM_DIR),
    };
    let missing = missing_files(&dir, &MNIST_FILES);
    if !missing.is_empty() {
        // Not downloaded: the MNIST hint about downloads would mislead here.
        return Err(Error::data(
            &dir,
            format!(
                "missing Fashion-MNIST file(s): {}; pass `--data DIR` for a directory that holds \
                 them, or install Debian's package (apt-get install dataset-fashion-mnist)",
                missing.join(", ")
            ),
        ));
    }
    load_idx_dir(&dir, MNIST_CLASSES)
}

/// [`mnist`] with the directory and mirrors given explicitly.
/// A failed download ends by saying how to use a local copy instead
/// ([`mnist_local_copy_hint`]); a directory the download created is removed again if it stayed
/// empty.
///
/// Without the `download` feature `download` is ignored: missing files are an error that lists
/// where they go.
pub fn mnist_from(dir: &Path, download: bool, mirrors: &[&str]) -> Result<Split> {
    if download && DOWNLOADS && !missing_files(dir, &MNIST_FILES).is_empty() {
        download_files(dir, mirrors, &MNIST_SHA256).map_err(|e| match e {
            Error::Download { url, msg } => Error::Download {
                url,
                msg: format!("{msg}; {}", mnist_local_copy_hint()),
            },
            other => other,
        })?;
    }
    load_mnist_dir(dir)
}

/// How to use MNIST files on disk instead of downloading; ends every MNIST download failure.
pub fn mnist_local_copy_hint() -> String {
    format!(
        "to use a local copy instead, pass `--data DIR` for a directory holding the four IDX \
         files ({}, each optionally .gz), or set ${DATA_ENV} so that ${DATA_ENV}/mnist holds \
         them; ${MIRROR_ENV} names another mirror",
        MNIST_FILES.join(", ")
    )
}
