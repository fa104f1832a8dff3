//! CIFAR-10, binary version (<https://www.cs.toronto.edu/~kriz/cifar.html>).
//!
//! Format: `data_batch_1.bin` .. `data_batch_5.bin` (the 50,000 training images) and
//! `test_batch.bin` (10,000 test images), usually in a directory `cifar-10-batches-bin/`. Each
//! file is a sequence of 3073-byte records: one label byte (0..=9: airplane, automobile, bird,
//! cat, deer, dog, frog, horse, ship, truck), then the 32x32 colour image as 3072 bytes, the red
//! plane row by row, then green, then blue: channel-major, the layout [`Dataset`] holds, so the
//! pixels are copied without reordering. The real files hold 10,000 records each; any whole
//! number of records (at least one) is accepted, so tests can use small files. A length that is
//! not a multiple of 3073, a label above 9 or a missing file is refused, naming the file.
//!
//! Download: the archive `cifar-10-binary.tar.gz` (170,052,171 bytes) from the authors' site
//! (or `$BNLAB_CIFAR10_URL`), verified against its SHA-256 [`CIFAR10_SHA256`] before anything is
//! extracted, then unpacked with the `tar` crate into a temporary directory next to the target
//! and renamed into place, so a failed or interrupted download leaves neither a half directory
//! nor an empty one behind.

use std::path::{Path, PathBuf};

use super::dataset::{Dataset, Pixels, Split};
use super::download::{fetch_hint, fetch_to_file, join_url, CreatedDirs, DOWNLOADS, NO_DOWNLOADS};
use super::mnist::DATA_ENV;
use crate::error::{Error, Result};

/// The training files, in the order their records are concatenated.
pub const CIFAR10_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];

/// The test file.
pub const CIFAR10_TEST_FILE: &str = "test_batch.bin";

/// Every file a CIFAR-10 directory must hold.
pub const CIFAR10_FILES: [&str; 6] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
    "test_batch.bin",
];

/// The directory the archive unpacks to.
pub const CIFAR10_SUBDIR: &str = "cifar-10-batches-bin";

/// Number of classes.
pub const CIFAR10_CLASSES: usize = 10;

/// Image shape (channels, rows, columns).
pub const CIFAR10_SHAPE: [usize; 3] = [3, 32, 32];

/// Bytes per record: one label byte and 3 x 32 x 32 pixel bytes.
pub const CIFAR10_RECORD: usize = 1 + 3 * 32 * 32;

/// File name of the archive.
pub const CIFAR10_ARCHIVE: &str = "cifar-10-binary.tar.gz";

/// Where the authors serve the archive (base URL, the file name is appended).
pub const CIFAR10_BASE_URL: &str = "https://www.cs.toronto.edu/~kriz/";

/// SHA-256 of `cifar-10-binary.tar.gz` as served by the authors (170,052,171 bytes; MD5
/// c32a1d4ab5d03f1284b67883e8d87530, the checksum torchvision lists).
pub const CIFAR10_SHA256: &str = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd";

/// Environment variable overriding [`CIFAR10_BASE_URL`]: a base URL (the archive name is
/// appended) or the archive's full URL (ending in `.tar.gz`).
pub const CIFAR10_URL_ENV: &str = "BNLAB_CIFAR10_URL";

/// Parses the records of one CIFAR-10 binary file (`path` only labels errors) into a
/// [`Dataset`] of 3x32x32 byte images with 10 classes.
pub fn parse_cifar10_batch(bytes: &[u8], path: &Path) -> Result<Dataset> {
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    parse_records(bytes, path, &mut images, &mut labels)?;
    Ok(Dataset::from_validated(
        Pixels::U8(images),
        labels,
        CIFAR10_SHAPE,
        CIFAR10_CLASSES,
    ))
}

/// Appends the records of one file to `images` and `labels`, after checking all of them.
fn parse_records(
    bytes: &[u8],
    path: &Path,
    images: &mut Vec<u8>,
    labels: &mut Vec<u8>,
) -> Result<()> {
    if bytes.is_empty() {
        return Err(Error::data(
            path,
            format!("empty file: a CIFAR-10 batch holds {CIFAR10_RECORD}-byte records"),
        ));
    }
    let extra = bytes.len() % CIFAR10_RECORD;
    if extra != 0 {
        return Err(Error::data(
            path,
            format!(
                "length {} bytes is not a whole number of {CIFAR10_RECORD}-byte records \
                 (1 label byte + 3x32x32 pixel bytes): {} record(s) and {extra} byte(s) left over",
                bytes.len(),
                bytes.len() / CIFAR10_RECORD
            ),
        ));
    }
    if let Some((i, r)) = bytes
        .chunks_exact(CIFAR10_RECORD)
        .enumerate()
        .find(|(_, r)| r[0] as usize >= CIFAR10_CLASSES)
    {
        return Err(Error::data(
            path,
            format!(
                "label out of range: record {i} (byte offset {}) has label {}, expected 0..{CIFAR10_CLASSES}",
                i * CIFAR10_RECORD,
                r[0]
            ),
        ));
    }
    let n = bytes.len() / CIFAR10_RECORD;
    images.reserve(n * (CIFAR10_RECORD - 1));
    labels.reserve(n);
    for r in bytes.chunks_exact(CIFAR10_RECORD) {
        labels.push(r[0]);
        images.extend_from_slice(&r[1..]);
    }
    Ok(())
}

/// Reads one batch file, appending to `images` / `labels`.
fn read_batch(path: &Path, images: &mut Vec<u8>, labels: &mut Vec<u8>) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_records(&bytes, path, images, labels)
}

/// The directory that holds (or should hold) the batch files for `dir`: `dir` itself, or
/// `dir/cifar-10-batches-bin` when that is a directory and `dir` holds none of the files.
pub fn cifar10_files_dir(dir: &Path) -> PathBuf {
    let sub = dir.join(CIFAR10_SUBDIR);
    let here = CIFAR10_FILES.iter().any(|f| dir.join(f).is_file());
    if !here && sub.is_dir() {
        sub
    } else {
        dir.to_path_buf()
    }
}

/// The files of [`CIFAR10_FILES`] that `dir` (resolved by [`cifar10_files_dir`]) lacks.
pub fn missing_cifar10_files(dir: &Path) -> Vec<&'static str> {
    let d = cifar10_files_dir(dir);
    CIFAR10_FILES
        .iter()
        .copied()
        .filter(|f| !d.join(f).is_file())
        .collect()
}

/// Loads CIFAR-10 from `dir`, which holds the six batch files or a `cifar-10-batches-bin/`
/// directory holding them: 50,000 training and 10,000 test images of 3x32x32 bytes for the real
/// set.
pub fn load_cifar10_dir(dir: &Path) -> Result<Split> {
    let d = cifar10_files_dir(dir);
    let missing: Vec<String> = CIFAR10_FILES
        .iter()
        .filter(|f| !d.join(f).is_file())
        .map(|f| d.join(f).display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::data(
            dir,
            format!(
                "missing CIFAR-10 file(s): {}; pass `--data DIR` for a directory that holds the \
                 six .bin files (or {CIFAR10_SUBDIR}/ with them), {}",
                missing.join(", "),
                fetch_hint()
            ),
        ));
    }
    let (train, test) = std::thread::scope(|s| {
        let test = s.spawn(|| {
            let (mut images, mut labels) = (Vec::new(), Vec::new());
            read_batch(&d.join(CIFAR10_TEST_FILE), &mut images, &mut labels)
                .map(|()| (images, labels))
        });
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        let train = CIFAR10_TRAIN_FILES
            .iter()
            .try_for_each(|f| read_batch(&d.join(f), &mut images, &mut labels))
            .map(|()| (images, labels));
        let test = test.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (train, test)
    });
    let ((tri, trl), (tei, tel)) = (train?, test?);
    let make = |images, labels| {
        Dataset::from_validated(Pixels::U8(images), labels, CIFAR10_SHAPE, CIFAR10_CLASSES)
    };
    Ok(Split {
        train: make(tri, trl),
        test: make(tei, tel),
    })
}

/// The archive's URL: `url` if given, else `$BNLAB_CIFAR10_URL`, else the authors' site. A
/// value ending in `.tar.gz` is the archive's URL; anything else is a base URL that
/// `cifar-10-binary.tar.gz` is appended to.
pub fn cifar10_url(url: Option<&str>) -> String {
    let env = std::env::var(CIFAR10_URL_ENV)
        .ok()
        .filter(|v| !v.is_empty());
    let base = url
        .map(str::to_string)
        .or(env)
        .unwrap_or_else(|| CIFAR10_BASE_URL.to_string());
    if base.ends_with(".tar.gz") || base.ends_with(".tgz") {
        base
    } else {
        join_url(&base, CIFAR10_ARCHIVE)
    }
}

/// How to use a copy on disk instead of downloading; ends every download failure.
pub fn cifar10_local_copy_hint() -> String {
    format!(
        "to use a local copy instead, unpack {CIFAR10_ARCHIVE} yourself and pass `--data DIR` \
         for the directory holding {CIFAR10_SUBDIR}/ (or its six .bin files), or set ${DATA_ENV} \
         so that ${DATA_ENV}/cifar10 holds it; ${CIFAR10_URL_ENV} names another server"
    )
}

/// Downloads the archive from `url` (the archive's full URL, see [`cifar10_url`]), checks that
/// its SHA-256 is `sha256`, and unpacks its `cifar-10-batches-bin/` into `dir` (created if
/// needed), so that `dir/cifar-10-batches-bin/*.bin` exist afterwards. Only regular files and
/// directories under `cifar-10-batches-bin/` are extracted. Atomic: the archive and the
/// extracted files go to temporary names inside `dir` that are removed on failure, the
/// directory is renamed into place only when complete, and a `dir` this call created is removed
/// again on failure. Refuses to touch an existing `dir/cifar-10-batches-bin`.
///
/// Without the `download` feature: `Error::Download` saying so, and nothing touched.
pub fn download_cifar10(dir: &Path, url: &str, sha256: &str) -> Result<()> {
    if !DOWNLOADS {
        return Err(Error::Download {
            url: url.to_string(),
            msg: format!("{NO_DOWNLOADS}; {}", cifar10_local_copy_hint()),
        });
    }
    let target = dir.join(CIFAR10_SUBDIR);
    if target.exists() {
        return Err(Error::data(
            &target,
            format!(
                "exists but lacks CIFAR-10 file(s) {}; remove it to download again, or complete it",
                missing_cifar10_files(dir).join(", ")
            ),
        ));
    }
    let created = CreatedDirs::create(dir)?;
    let pid = std::process::id();
    let archive = dir.join(format!(".{CIFAR10_ARCHIVE}.{pid}.part"));
    let staging = dir.join(format!(".{CIFAR10_SUBDIR}.{pid}.part"));
    let result = (|| {
        let (got, len) = fetch_to_file(url, &archive).map_err(|msg| Error::Download {
            url: url.to_string(),
            msg: format!("{msg}; {}", cifar10_local_copy_hint()),
        })?;
        if !got.eq_ignore_ascii_case(sha256) {
            return Err(Error::Download {
                url: url.to_string(),
                msg: format!(
                    "SHA-256 checksum mismatch of the archive ({len} bytes): expected {sha256}, \
                     got {got}; nothing was extracted; {}",
                    cifar10_local_copy_hint()
                ),
            });
        }
        unpack(&archive, &staging, url)?;
        let unpacked = staging.join(CIFAR10_SUBDIR);
        std::fs::rename(&unpacked, &target).map_err(|e| Error::io(&target, e))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        eprintln!(
            "downloaded {url} ({len} bytes, SHA-256 verified) -> {}",
            target.display()
        );
        Ok(())
    })();
    let _ = std::fs::remove_file(&archive);
    let _ = std::fs::remove_dir_all(&staging);
    if result.is_err() {
        created.remove_if_empty();
    }
    result
}

/// Extracts `cifar-10-batches-bin/` of the verified archive into `staging` and checks that
/// the six files came out with plausible lengths.
fn unpack(archive: &Path, staging: &Path, url: &str) -> Result<()> {
    let bad = |msg: String| Error::data(archive, format!("archive from {url}: {msg}"));
    std::fs::create_dir(staging).map_err(|e| Error::io(staging, e))?;
    let file = std::fs::File::open(archive).map_err(|e| Error::io(archive, e))?;
    let gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(file));
    let mut tar = tar::Archive::new(gz);
    tar.set_preserve_permissions(false);
    tar.set_preserve_mtime(false);
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("not a tar.gz archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("corrupt tar.gz archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("bad member name: {e}")))?
            .into_owned();
        let ours = path
            .components()
            .next()
            .is_some_and(|c| c.as_os_str() == CIFAR10_SUBDIR);
        let kind = entry.header().entry_type();
        if !ours || !(kind.is_file() || kind.is_dir()) {
            continue;
        }
        let ok = entry.unpack_in(staging).map_err(|e| {
            bad(format!(
                "extracting {} into {} failed: {e}",
                path.display(),
                staging.display()
            ))
        })?;
        if !ok {
            return Err(bad(format!(
                "member {} escapes its directory",
                path.display()
            )));
        }
    }
    let out = staging.join(CIFAR10_SUBDIR);
    for f in CIFAR10_FILES {
        let p = out.join(f);
        let len = std::fs::metadata(&p)
            .map(|m| m.len())
            .map_err(|_| bad(format!("the archive has no {CIFAR10_SUBDIR}/{f}")))?;
        if len == 0 || len % CIFAR10_RECORD as u64 != 0 {
            return Err(bad(format!(
                "{CIFAR10_SUBDIR}/{f} has {len} bytes, not a whole number of {CIFAR10_RECORD}-byte records"
            )));
        }
        // Durable before the rename makes it visible.
        if let Ok(fh) = std::fs::File::open(&p) {
            let _ = fh.sync_all();
        }
    }
    Ok(())
}

/// CIFAR-10 from `dir` (see [`load_cifar10_dir`]); when files are missing and `download` is set,
/// first fetched from `url` (the archive's full URL) and verified against `sha256`. Without the
/// `download` feature `download` is ignored: missing files are an error saying where they go.
pub fn cifar10_from(dir: &Path, download: bool, url: &str, sha256: &str) -> Result<Split> {
    if download && DOWNLOADS && !missing_cifar10_files(dir).is_empty() {
        download_cifar10(dir, url, sha256)?;
    }
    load_cifar10_dir(dir)
}

/// CIFAR-10 from `--data DIR`, else `$BNLAB_DATA/cifar10`, else `./data/cifar10`; downloaded
/// first (from `$BNLAB_CIFAR10_URL` or the authors' site, SHA-256 verified) when missing and
/// `download` is set.
pub fn cifar10(flag: Option<&Path>, download: bool) -> Result<Split> {
    let dir = super::mnist::resolve_data_dir(flag, "cifar10");
    cifar10_from(&dir, download, &cifar10_url(None), CIFAR10_SHA256)
}
