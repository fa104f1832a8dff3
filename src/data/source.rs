//! Choosing the data set from the command line: `--data PATH` and `--dataset NAME`.
//!
//! Rules of [`resolve_source`]:
//!
//! - `--data FILE.npz`: a NumPy archive ([`super::npz`]).
//! - `--data DIR` holding the four IDX files (each raw or `.gz`): that IDX set, 10 classes.
//! - `--data DIR` holding the six CIFAR-10 binary files, or a `cifar-10-batches-bin/`
//!   sub-directory with them: CIFAR-10.
//! - `--data` naming another regular file, a directory with neither layout, a directory with
//!   both (unless `--dataset` chooses), or nothing: an error listing what was looked for.
//! - `--data DIR --dataset NAME`: DIR is NAME's directory. `mnist` and `cifar10` are downloaded
//!   into it when files are missing and downloads are allowed (as `bnlab train --data DIR` has
//!   always done for MNIST); DIR holding the other layout is an error.
//! - `--dataset NAME` alone: NAME's default place, `$BNLAB_DATA/<name>` or else
//!   `./data/<name>` (names `mnist`, `fashion-mnist`, `cifar10`), downloading `mnist` and
//!   `cifar10` when missing and allowed. `fashion-mnist` is never downloaded but is also looked
//!   for in Debian's `/usr/share/datasets/fashion-mnist`.
//! - Neither: MNIST, as `--dataset mnist`.
//! - `--data FILE.npz --dataset NAME`: the file is loaded; NAME is not checked against it.
//!
//! A failed download ends by saying how to point bnlab at a local copy (`--data DIR`,
//! `$BNLAB_DATA`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::cifar::{
    cifar10_files_dir, cifar10_from, cifar10_url, load_cifar10_dir, CIFAR10_FILES, CIFAR10_SHA256,
    CIFAR10_SUBDIR,
};
use super::dataset::Split;
use super::download::{DOWNLOADS, MNIST_MIRRORS};
use super::mnist::{
    find_file, load_idx_dir, missing_files, mnist_from, DATA_ENV, FASHION_SYSTEM_DIR, MIRROR_ENV,
    MNIST_CLASSES, MNIST_FILES,
};
use super::npz::load_npz;
use crate::error::{Error, Result};

/// Where a data set is read from, and in which format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataSource {
    /// A directory of four IDX files in the MNIST layout (MNIST, Fashion-MNIST), 10 classes.
    Idx(PathBuf),
    /// A directory holding the CIFAR-10 binary files (or `cifar-10-batches-bin/` with them).
    Cifar10(PathBuf),
    /// A NumPy `.npz` file in Keras's `mnist.npz` layout.
    Npz(PathBuf),
}

impl DataSource {
    /// Loads the data set (never downloads).
    pub fn load(&self) -> Result<Split> {
        match self {
            DataSource::Idx(d) => load_idx_dir(d, MNIST_CLASSES),
            DataSource::Cifar10(d) => load_cifar10_dir(d),
            DataSource::Npz(f) => load_npz(f),
        }
    }

    /// The file or directory.
    pub fn path(&self) -> &Path {
        match self {
            DataSource::Idx(p) | DataSource::Cifar10(p) | DataSource::Npz(p) => p,
        }
    }

    /// The format's short name: `idx`, `cifar10` or `npz`.
    pub fn format(&self) -> &'static str {
        match self {
            DataSource::Idx(_) => "idx",
            DataSource::Cifar10(_) => "cifar10",
            DataSource::Npz(_) => "npz",
        }
    }
}

/// The data sets `--dataset` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// MNIST digits (IDX), downloadable.
    Mnist,
    /// Fashion-MNIST (IDX), not downloaded.
    FashionMnist,
    /// CIFAR-10 (binary version), downloadable.
    Cifar10,
}

impl DatasetName {
    /// Every name, in the order help texts list them.
    pub const ALL: [DatasetName; 3] = [
        DatasetName::Mnist,
        DatasetName::FashionMnist,
        DatasetName::Cifar10,
    ];

    /// Parses `mnist`, `fashion-mnist` or `cifar10` (also `fashion_mnist`, `cifar-10`).
    pub fn parse(s: &str) -> Result<DatasetName> {
        match s.trim().to_ascii_lowercase().as_str() {
            "mnist" => Ok(DatasetName::Mnist),
            "fashion-mnist" | "fashion_mnist" | "fashionmnist" => Ok(DatasetName::FashionMnist),
            "cifar10" | "cifar-10" => Ok(DatasetName::Cifar10),
            _ => Err(Error::config(
                "--dataset",
                format!("'{s}' (expected mnist, fashion-mnist or cifar10)"),
            )),
        }
    }

    /// The canonical name, also the directory name under `$BNLAB_DATA` / `./data`.
    pub fn as_str(self) -> &'static str {
        match self {
            DatasetName::Mnist => "mnist",
            DatasetName::FashionMnist => "fashion-mnist",
            DatasetName::Cifar10 => "cifar10",
        }
    }

    /// True for the sets this build can download: MNIST and CIFAR-10, with the `download`
    /// feature.
    pub fn downloadable(self) -> bool {
        DOWNLOADS && !matches!(self, DatasetName::FashionMnist)
    }

    /// True for the IDX sets.
    fn is_idx(self) -> bool {
        !matches!(self, DatasetName::Cifar10)
    }
}

/// What [`resolve_source`] takes from the environment, made explicit so tests need not change
/// the process's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSettings {
    /// `$BNLAB_DATA` (unset or empty: `None`, meaning `./data`).
    pub data_root: Option<PathBuf>,
    /// MNIST mirrors: `$BNLAB_MNIST_MIRROR` or [`MNIST_MIRRORS`].
    pub mnist_mirrors: Vec<String>,
    /// The CIFAR-10 archive's URL ([`cifar10_url`]).
    pub cifar10_url: String,
    /// The expected SHA-256 of that archive.
    pub cifar10_sha256: String,
    /// Where a system package puts Fashion-MNIST ([`FASHION_SYSTEM_DIR`]).
    pub fashion_system_dir: PathBuf,
}

impl SourceSettings {
    /// The settings from the process environment (`BNLAB_DATA`, `BNLAB_MNIST_MIRROR`,
    /// `BNLAB_CIFAR10_URL`) and the built-in defaults.
    pub fn from_env() -> SourceSettings {
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        SourceSettings {
            data_root: var(DATA_ENV).map(PathBuf::from),
            mnist_mirrors: match var(MIRROR_ENV).map(OsString::into_string) {
                Some(Ok(m)) => vec![m],
                _ => MNIST_MIRRORS.iter().map(|m| m.to_string()).collect(),
            },
            cifar10_url: cifar10_url(None),
            cifar10_sha256: CIFAR10_SHA256.to_string(),
            fashion_system_dir: PathBuf::from(FASHION_SYSTEM_DIR),
        }
    }

    /// `$BNLAB_DATA/<name>` or `./data/<name>`.
    pub fn default_dir(&self, name: DatasetName) -> PathBuf {
        match &self.data_root {
            Some(root) => root.join(name.as_str()),
            None => Path::new("data").join(name.as_str()),
        }
    }
}

/// True if `dir` holds at least one of the IDX files.
fn has_idx(dir: &Path) -> bool {
    MNIST_FILES.iter().any(|n| find_file(dir, n).is_some())
}

/// True if `dir` (or its `cifar-10-batches-bin/`) holds at least one CIFAR-10 file.
fn has_cifar10(dir: &Path) -> bool {
    let d = cifar10_files_dir(dir);
    CIFAR10_FILES.iter().any(|f| d.join(f).is_file())
}

/// What `--data` may name, for error messages.
fn looked_for() -> String {
    format!(
        "--data takes an .npz file (x_train, y_train, x_test, y_test), a directory holding the \
         IDX files {} (each optionally .gz), or a directory holding the CIFAR-10 binary files \
         {} (directly or in {CIFAR10_SUBDIR}/)",
        MNIST_FILES.join(", "),
        CIFAR10_FILES.join(", ")
    )
}

/// The source `--data PATH` names, by the rules of the module doc (without `--dataset`).
/// Looks only at names: the files are checked when loaded.
pub fn detect_source(path: &Path) -> Result<DataSource> {
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::data(path, format!("cannot use --data: {e}; {}", looked_for())))?;
    if meta.is_file() {
        let npz = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"));
        return if npz {
            Ok(DataSource::Npz(path.to_path_buf()))
        } else {
            Err(Error::data(
                path,
                format!("a file, but not an .npz; {}", looked_for()),
            ))
        };
    }
    match (has_idx(path), has_cifar10(path)) {
        (true, false) => Ok(DataSource::Idx(path.to_path_buf())),
        (false, true) => Ok(DataSource::Cifar10(path.to_path_buf())),
        (true, true) => Err(Error::data(
            path,
            "holds both IDX and CIFAR-10 files; pass --dataset mnist, fashion-mnist or \
             cifar10 to choose",
        )),
        (false, false) => Err(Error::data(
            path,
            format!("holds no data set files; {}", looked_for()),
        )),
    }
}

/// Loads the data set chosen by `--data` and `--dataset` by the rules of the module doc,
/// downloading MNIST and CIFAR-10 when missing if `download` is set; settings from the
/// environment ([`SourceSettings::from_env`]).
pub fn resolve_source(data: Option<&Path>, dataset: Option<&str>, download: bool) -> Result<Split> {
    resolve_source_with(data, dataset, download, &SourceSettings::from_env()).map(|(_, s)| s)
}

/// [`resolve_source`] with explicit settings; also returns where the data came from.
pub fn resolve_source_with(
    data: Option<&Path>,
    dataset: Option<&str>,
    download: bool,
    settings: &SourceSettings,
) -> Result<(DataSource, Split)> {
    let name = dataset.map(DatasetName::parse).transpose()?;
    match (data, name) {
        (Some(path), None) => {
            let src = detect_source(path)?;
            let split = src.load()?;
            Ok((src, split))
        }
        (Some(path), Some(name)) => named_at(path, name, download, settings),
        (None, name) => {
            let name = name.unwrap_or(DatasetName::Mnist);
            if name == DatasetName::FashionMnist {
                return fashion_default(settings);
            }
            named_at(&settings.default_dir(name), name, download, settings)
        }
    }
}

/// Data set `name` in `path` (a directory, or an .npz file), downloaded there if allowed.
fn named_at(
    path: &Path,
    name: DatasetName,
    download: bool,
    settings: &SourceSettings,
) -> Result<(DataSource, Split)> {
    if path.is_file() {
        // An .npz can hold any of them; anything else is refused by detect_source.
        let src = detect_source(path)?;
        let split = src.load()?;
        return Ok((src, split));
    }
    let (idx, cifar) = (has_idx(path), has_cifar10(path));
    let wrong = if name.is_idx() {
        cifar && !idx
    } else {
        idx && !cifar
    };
    if wrong {
        return Err(Error::data(
            path,
            format!(
                "--dataset {} but this directory holds {} files",
                name.as_str(),
                if cifar { "CIFAR-10" } else { "IDX" }
            ),
        ));
    }
    let fetch = download && name.downloadable();
    if !path.exists() && !fetch {
        let how = if name.downloadable() {
            "drop `--no-download` to fetch it there, or pass `--data DIR` for a directory that \
             holds it"
        } else if name.is_idx() {
            "pass `--data DIR` for a directory that holds its four IDX files, or put them there"
        } else {
            "pass `--data DIR` for a directory that holds its six .bin files (or \
             cifar-10-batches-bin/ with them), or put them there"
        };
        return Err(Error::data(
            path,
            format!("no such directory for {}; {how}", name.as_str()),
        ));
    }
    match name {
        DatasetName::Mnist => {
            let mirrors: Vec<&str> = settings.mnist_mirrors.iter().map(String::as_str).collect();
            let split = mnist_from(path, fetch, &mirrors)?;
            Ok((DataSource::Idx(path.to_path_buf()), split))
        }
        DatasetName::FashionMnist => {
            let split = fashion_at(path)?;
            Ok((DataSource::Idx(path.to_path_buf()), split))
        }
        DatasetName::Cifar10 => {
            let split = cifar10_from(path, fetch, &settings.cifar10_url, &settings.cifar10_sha256)?;
            Ok((DataSource::Cifar10(path.to_path_buf()), split))
        }
    }
}

/// Fashion-MNIST from `dir`, with an error that does not suggest downloading.
fn fashion_at(dir: &Path) -> Result<Split> {
    let missing = missing_files(dir, &MNIST_FILES);
    if !missing.is_empty() {
        return Err(Error::data(
            dir,
            format!(
                "missing Fashion-MNIST file(s): {} (each optionally .gz); pass `--data DIR` for a \
                 directory that holds them, or install Debian's package (apt-get install \
                 dataset-fashion-mnist)",
                missing.join(", ")
            ),
        ));
    }
    load_idx_dir(dir, MNIST_CLASSES)
}

/// Fashion-MNIST from its default places: `$BNLAB_DATA/fashion-mnist` (or
/// `./data/fashion-mnist`), then the system directory.
fn fashion_default(settings: &SourceSettings) -> Result<(DataSource, Split)> {
    let candidates = [
        settings.default_dir(DatasetName::FashionMnist),
        settings.fashion_system_dir.clone(),
    ];
    for dir in &candidates {
        if missing_files(dir, &MNIST_FILES).is_empty() {
            let split = load_idx_dir(dir, MNIST_CLASSES)?;
            return Ok((DataSource::Idx(dir.clone()), split));
        }
    }
    let looked: Vec<String> = candidates.iter().map(|d| d.display().to_string()).collect();
    Err(Error::data(
        &candidates[0],
        format!(
            "Fashion-MNIST not found (looked in {}) and it is not downloaded; pass `--data DIR` \
             for a directory holding its four IDX files ({}, each optionally .gz), set \
             ${DATA_ENV} so that ${DATA_ENV}/fashion-mnist holds them, or install Debian's \
             package (apt-get install dataset-fashion-mnist)",
            looked.join(" and "),
            MNIST_FILES.join(", ")
        ),
    ))
}
