//! Fetching data files from mirrors, verified by SHA-256 before anything is written.
//!
//! Checksums are over the *decompressed* files because the gzip wrappers differ between mirrors
//! while the IDX content is the same everywhere. A file is written only after its content has
//! been verified, and then atomically (temporary file, fsync, rename), so an interrupted or bad
//! download never leaves a file that a later run would trust.
//!
//! Downloading needs the `download` feature (on by default). Without it the functions here
//! exist but fetch nothing: they return `Error::Download` saying so, and the loaders report
//! missing files with where to put them.

#[cfg(feature = "download")]
use std::fs::File;
#[cfg(feature = "download")]
use std::io::Write;
use std::path::{Path, PathBuf};
#[cfg(feature = "download")]
use std::time::Duration;

use sha2::{Digest, Sha256};

#[cfg(feature = "download")]
use super::idx::{gunzip, is_gzip};
use super::mnist::find_file;
use crate::error::{Error, Result};

/// Whether this build can download data sets (the `download` feature).
pub const DOWNLOADS: bool = cfg!(feature = "download");

/// Why nothing was downloaded, in a build without the `download` feature.
pub(crate) const NO_DOWNLOADS: &str =
    "this build of bnlab cannot download (it lacks the `download` feature)";

/// How a message about missing data files ends: fetching them (`--no-download` was given), or
/// where they go when this build cannot download.
pub(crate) fn fetch_hint() -> String {
    if DOWNLOADS {
        "or drop `--no-download` to fetch them".to_string()
    } else {
        format!("or copy them there ({NO_DOWNLOADS})")
    }
}

/// Base URLs (ending in `/`) that serve `<name>.gz` for each MNIST file, tried in order.
/// The original yann.lecun.com site now refuses automated downloads, so it is not listed.
pub const MNIST_MIRRORS: &[&str] = &[
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
];

/// SHA-256 of each decompressed MNIST file.
pub const MNIST_SHA256: [(&str, &str); 4] = [
    (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
];

#[cfg(feature = "download")]
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Whole-request limit: generous enough for the 9.9 MB training images on a slow link, short
/// enough that a stalled mirror gives way to the next one.
#[cfg(feature = "download")]
const GLOBAL_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest response body accepted (ureq's default cap of 10 MB is below the MNIST image file).
#[cfg(feature = "download")]
const MAX_BODY: u64 = 256 * 1024 * 1024;

/// Downloads every `(name, sha256)` in `files` that is missing from `dir` (as `name` or
/// `name.gz`): tries `{mirror}{name}.gz` for each mirror in turn, checks the SHA-256 of the
/// decompressed content and writes `dir/{name}.gz`. Files already present are left alone.
///
/// Errors: `Error::Download` when no mirror gives a file with the right checksum (or, without
/// the `download` feature, when a file is missing), `Error::Io` when `dir` cannot be created
/// or written.
pub fn download_files(dir: &Path, mirrors: &[&str], files: &[(&str, &str)]) -> Result<()> {
    let todo: Vec<(&str, &str)> = files
        .iter()
        .copied()
        .filter(|(name, _)| find_file(dir, name).is_none())
        .collect();
    if todo.is_empty() {
        return Ok(());
    }
    if !DOWNLOADS {
        return Err(Error::Download {
            url: format!("{}.gz", todo[0].0),
            msg: NO_DOWNLOADS.to_string(),
        });
    }
    let created = CreatedDirs::create(dir)?;
    let result = fetch_all(dir, mirrors, &todo);
    if result.is_err() {
        // Files already verified and written stay; directories left empty go.
        created.remove_if_empty();
    }
    result
}

/// The downloads of [`download_files`] into the existing `dir`.
#[cfg(not(feature = "download"))]
fn fetch_all(_dir: &Path, _mirrors: &[&str], todo: &[(&str, &str)]) -> Result<()> {
    Err(Error::Download {
        url: todo
            .first()
            .map_or_else(String::new, |t| format!("{}.gz", t.0)),
        msg: NO_DOWNLOADS.to_string(),
    })
}

/// The downloads of [`download_files`] into the existing `dir`.
#[cfg(feature = "download")]
fn fetch_all(dir: &Path, mirrors: &[&str], todo: &[(&str, &str)]) -> Result<()> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_global(Some(GLOBAL_TIMEOUT))
        .build()
        .into();
    for &(name, sha) in todo {
        let gz_name = format!("{name}.gz");
        let mut failures = Vec::new();
        let mut fetched = None;
        for mirror in mirrors {
            let url = join_url(mirror, &gz_name);
            match fetch_verified(&agent, &url, sha) {
                Ok(bytes) => {
                    fetched = Some((url, bytes));
                    break;
                }
                Err(msg) => {
                    eprintln!("warning: {url}: {msg}");
                    failures.push(format!("{url}: {msg}"));
                }
            }
        }
        let Some((url, bytes)) = fetched else {
            let msg = if failures.is_empty() {
                "no mirrors to download from".to_string()
            } else {
                format!(
                    "all {} mirror(s) failed: {}",
                    failures.len(),
                    failures.join("; ")
                )
            };
            return Err(Error::Download { url: gz_name, msg });
        };
        let dest = dir.join(&gz_name);
        write_atomic(&dest, &bytes)?;
        eprintln!(
            "downloaded {url} ({} bytes, SHA-256 verified) -> {}",
            bytes.len(),
            dest.display()
        );
    }
    Ok(())
}

/// `base` + `file`, inserting a `/` if `base` lacks one (users write mirrors either way).
pub(crate) fn join_url(base: &str, file: &str) -> String {
    if base.ends_with('/') {
        format!("{base}{file}")
    } else {
        format!("{base}/{file}")
    }
}

/// GETs `url` and returns the (gzipped) body if its decompressed content has SHA-256 `sha`;
/// otherwise a one-line reason for the failure.
#[cfg(feature = "download")]
fn fetch_verified(
    agent: &ureq::Agent,
    url: &str,
    sha: &str,
) -> std::result::Result<Vec<u8>, String> {
    // Ask for the bytes as stored: a server applying Content-Encoding on top of the .gz would
    // otherwise have ureq strip our gzip layer and the file written would not be the .gz.
    let mut resp = agent
        .get(url)
        .header("Accept-Encoding", "identity")
        .call()
        .map_err(|e| e.to_string())?;
    let body = resp
        .body_mut()
        .with_config()
        .limit(MAX_BODY)
        .read_to_vec()
        .map_err(|e| format!("reading the response failed: {e}"))?;
    if !is_gzip(&body) {
        return Err(format!(
            "response ({} bytes) is not a gzip file",
            body.len()
        ));
    }
    let raw = gunzip(&body, Path::new(url)).map_err(|e| match e {
        Error::Data { msg, .. } => msg,
        other => other.to_string(),
    })?;
    let got = sha256_hex(&raw);
    if !got.eq_ignore_ascii_case(sha) {
        return Err(format!(
            "SHA-256 checksum mismatch of the decompressed content: expected {sha}, got {got}"
        ));
    }
    Ok(body)
}

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(feature = "download")]
use crate::fsutil::write_atomic;

/// The directories that `create_dir_all(dir)` had to make, deepest first, so that a failed
/// download can remove them again instead of leaving empty directories behind.
pub(crate) struct CreatedDirs(Vec<PathBuf>);

impl CreatedDirs {
    /// Creates `dir` and its missing ancestors, remembering which were missing.
    pub(crate) fn create(dir: &Path) -> Result<CreatedDirs> {
        let mut missing = Vec::new();
        let mut p = Some(dir);
        while let Some(d) = p {
            if d.as_os_str().is_empty() || d.exists() {
                break;
            }
            missing.push(d.to_path_buf());
            p = d.parent();
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        Ok(CreatedDirs(missing))
    }

    /// Removes the directories it created, deepest first, stopping at the first that is not
    /// empty (`remove_dir` never deletes content).
    pub(crate) fn remove_if_empty(&self) {
        for d in &self.0 {
            if std::fs::remove_dir(d).is_err() {
                break;
            }
        }
    }
}

/// Largest archive accepted by [`fetch_to_file`] (the CIFAR-10 archive is 170 MB).
#[cfg(feature = "download")]
const MAX_ARCHIVE: u64 = 1 << 30;

/// A stalled connection (no byte for this long) fails the download; there is no limit on the
/// whole transfer, which can take a while on a slow link.
#[cfg(feature = "download")]
const READ_STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// GETs `url` into the new file `dest`, streaming (never the whole body in memory), with a
/// progress bar on a terminal; returns the body's SHA-256 (lower-case hex) and length. On any
/// failure `dest` is removed and the reason returned as one line.
pub(crate) fn fetch_to_file(url: &str, dest: &Path) -> std::result::Result<(String, u64), String> {
    let result = fetch_to_file_inner(url, dest);
    if result.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    result
}

#[cfg(not(feature = "download"))]
fn fetch_to_file_inner(_url: &str, _dest: &Path) -> std::result::Result<(String, u64), String> {
    Err(NO_DOWNLOADS.to_string())
}

#[cfg(feature = "download")]
fn fetch_to_file_inner(url: &str, dest: &Path) -> std::result::Result<(String, u64), String> {
    use std::io::Read;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(READ_STALL_TIMEOUT))
        .timeout_per_read(Some(READ_STALL_TIMEOUT))
        .build()
        .into();
    let mut resp = agent
        .get(url)
        .header("Accept-Encoding", "identity")
        .call()
        .map_err(|e| e.to_string())?;
    let total = resp.body().content_length();
    let mut reader = resp.body_mut().with_config().limit(MAX_ARCHIVE).reader();
    let mut file = File::create(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(format!("downloading {url}"));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                bar.abandon();
                return Err(format!(
                    "reading the response failed after {len} bytes: {e}"
                ));
            }
        };
        hasher.update(&buf[..n]);
        file.write_all(&buf[..n])
            .map_err(|e| format!("{}: {e}", dest.display()))?;
        len += n as u64;
        bar.set_position(len);
    }
    bar.finish_and_clear();
    if let Some(t) = total {
        if t != len {
            return Err(format!("the response ended after {len} of {t} bytes"));
        }
    }
    file.sync_all()
        .map_err(|e| format!("{}: {e}", dest.display()))?;
    let sha = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((sha, len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{load_cifar10_dir, load_mnist_dir, mnist_from};

    /// Missing files are reported with where they go; the hint offers a download only in a
    /// build that can download, and `mnist_from(.., download = true, ..)` tries one only then.
    #[test]
    fn missing_data_says_where_the_files_go() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("mnist");
        let msg = load_mnist_dir(&dir).unwrap_err().to_string();
        let want = dir.join("train-images-idx3-ubyte.gz");
        assert!(msg.contains(&want.display().to_string()), "{msg}");
        assert!(msg.contains("--data DIR"), "{msg}");
        assert_eq!(msg.contains("--no-download"), DOWNLOADS, "{msg}");
        assert_eq!(msg.contains("`download` feature"), !DOWNLOADS, "{msg}");
        let msg = load_cifar10_dir(&dir).unwrap_err().to_string();
        assert!(msg.contains("data_batch_1.bin"), "{msg}");
        assert_eq!(msg.contains("--no-download"), DOWNLOADS, "{msg}");
        // No mirrors: a build that downloads fails the download; one that cannot reports the
        // missing files, and creates nothing.
        match mnist_from(&dir, true, &[]) {
            Err(Error::Download { msg, .. }) if DOWNLOADS => {
                assert!(msg.contains("no mirrors"), "{msg}")
            }
            Err(Error::Data { msg, .. }) if !DOWNLOADS => {
                assert!(msg.contains("missing data file"), "{msg}")
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(!dir.exists());
        let err = download_files(&dir, &["http://127.0.0.1:9/"], &MNIST_SHA256).unwrap_err();
        assert!(matches!(err, Error::Download { .. }), "{err}");
        assert!(!dir.exists());
    }
}
