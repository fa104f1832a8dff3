//! Reading and writing IDX files, the format MNIST (and Fashion-MNIST) ship in.
//!
//! An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions), one
//! big-endian `u32` per dimension, then the elements in row-major order. Only type code 0x08
//! (unsigned byte) is supported, since that is all the image and label files use. Files may be
//! gzip-wrapped; gzip is recognised by its magic bytes (1f 8b), not by the file name, so a
//! renamed or decompressed-in-place file still loads.
//!
//! Every malformed input is reported as [`Error::Data`] naming the file and the exact problem;
//! nothing here panics on file content.

use std::borrow::Cow;
use std::io::{Read, Write};
use std::path::Path;

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use crate::error::{Error, Result};

/// IDX type code for unsigned bytes, the only element type supported.
const TYPE_U8: u8 = 0x08;

/// The two magic bytes that start every gzip member (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Deflate cannot expand data by more than about 1032:1, so a gzip trailer claiming more than
/// that is lying; this bounds the up-front allocation a crafted file can cause.
const MAX_DEFLATE_RATIO: usize = 1032;

/// A decoded IDX file: its dimensions and the row-major element bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idx {
    /// The dimensions, outermost first.
    pub dims: Vec<usize>,
    /// The elements, row-major, `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

/// Reads an IDX file of unsigned bytes with exactly `expected_ndims` dimensions, raw or gzipped.
pub fn read_idx(path: &Path, expected_ndims: usize) -> Result<Idx> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = if is_gzip(&raw) {
        gunzip(&raw, path)?
    } else {
        raw
    };
    parse_idx_owned(bytes, path, expected_ndims)
}

/// Parses IDX bytes (already decompressed). `path_for_errors` only labels error messages.
pub fn parse_idx(bytes: &[u8], path_for_errors: &Path, expected_ndims: usize) -> Result<Idx> {
    let (dims, header_len) = parse_header(bytes, path_for_errors, expected_ndims)?;
    Ok(Idx {
        dims,
        data: bytes[header_len..].to_vec(),
    })
}

/// Like [`parse_idx`] but reuses the buffer, so a 47 MB image file is not copied a second time.
fn parse_idx_owned(mut bytes: Vec<u8>, path: &Path, expected_ndims: usize) -> Result<Idx> {
    let (dims, header_len) = parse_header(&bytes, path, expected_ndims)?;
    bytes.drain(..header_len);
    Ok(Idx { dims, data: bytes })
}

/// Validates the header and the data length; returns the dimensions and the header length.
fn parse_header(bytes: &[u8], path: &Path, expected_ndims: usize) -> Result<(Vec<usize>, usize)> {
    if bytes.len() < 4 {
        return Err(Error::data(
            path,
            format!(
                "not an IDX file: {} bytes is too short for the 4-byte magic",
                bytes.len()
            ),
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::data(
            path,
            format!(
                "not an IDX file: bad magic {:02x} {:02x} {:02x} {:02x} (expected 00 00 08 {:02x})",
                bytes[0],
                bytes[1],
                bytes[2],
                bytes[3],
                expected_ndims.min(255)
            ),
        ));
    }
    if bytes[2] != TYPE_U8 {
        return Err(Error::data(
            path,
            format!(
                "unsupported IDX type code 0x{:02x} (only 0x08, unsigned byte, is supported)",
                bytes[2]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims != expected_ndims {
        return Err(Error::data(
            path,
            format!("wrong number of dimensions: expected {expected_ndims}, found {ndims}"),
        ));
    }
    let header_len = 4 + 4 * ndims;
    if bytes.len() < header_len {
        return Err(Error::data(
            path,
            format!(
                "truncated header: {ndims} dimensions need {header_len} header bytes, found {}",
                bytes.len()
            ),
        ));
    }
    let dims: Vec<usize> = bytes[4..header_len]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    if let Some(i) = dims.iter().position(|&d| d == 0) {
        return Err(Error::data(
            path,
            format!("dimension {i} is zero (dimensions {dims:?})"),
        ));
    }
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            Error::data(
                path,
                format!("dimensions {dims:?} overflow: their product does not fit in memory"),
            )
        })?;
    let found = bytes.len() - header_len;
    if found < expected {
        return Err(Error::data(
            path,
            format!("truncated: expected {expected} bytes of data, found {found}"),
        ));
    }
    if found > expected {
        return Err(Error::data(
            path,
            format!(
                "trailing bytes: expected {expected} bytes of data, found {found} ({} extra)",
                found - expected
            ),
        ));
    }
    Ok((dims, header_len))
}

/// True if `bytes` start with the gzip magic.
pub fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&GZIP_MAGIC)
}

/// Decompresses a whole gzip stream (possibly several members) held in memory.
pub fn gunzip(gz: &[u8], path_for_errors: &Path) -> Result<Vec<u8>> {
    // The trailer's ISIZE (uncompressed size mod 2^32) lets us allocate once instead of growing
    // the buffer through ~25 reallocations; it is only a hint, so it is capped.
    let hint = if gz.len() >= 18 {
        let t = &gz[gz.len() - 4..];
        u32::from_le_bytes([t[0], t[1], t[2], t[3]]) as usize
    } else {
        0
    };
    let mut out = Vec::with_capacity(hint.min(gz.len().saturating_mul(MAX_DEFLATE_RATIO)));
    MultiGzDecoder::new(gz)
        .read_to_end(&mut out)
        .map_err(|e| Error::data(path_for_errors, format!("corrupt gzip stream: {e}")))?;
    Ok(out)
}

/// Encodes `data` with dimensions `dims` as IDX bytes (type code 0x08).
pub fn idx_bytes(dims: &[usize], data: &[u8], path_for_errors: &Path) -> Result<Vec<u8>> {
    if dims.len() > 255 {
        return Err(Error::data(
            path_for_errors,
            format!("IDX supports at most 255 dimensions, got {}", dims.len()),
        ));
    }
    if let Some(&d) = dims.iter().find(|&&d| d > u32::MAX as usize) {
        return Err(Error::data(
            path_for_errors,
            format!("dimension {d} does not fit in the IDX u32 header"),
        ));
    }
    let product = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if product != Some(data.len()) {
        return Err(Error::data(
            path_for_errors,
            format!(
                "dimensions {dims:?} do not match {} bytes of data",
                data.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(4 + 4 * dims.len() + data.len());
    out.extend_from_slice(&[0, 0, TYPE_U8, dims.len() as u8]);
    for &d in dims {
        out.extend_from_slice(&(d as u32).to_be_bytes());
    }
    out.extend_from_slice(data);
    Ok(out)
}

/// Gzip-compresses `bytes` in memory.
pub fn gzip_bytes(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    // Writing into a Vec cannot fail.
    enc.write_all(bytes).expect("writing to a Vec cannot fail");
    enc.finish().expect("writing to a Vec cannot fail")
}

/// Writes an IDX file (optionally gzipped). Used by tests and tools that make synthetic data.
pub fn write_idx(path: &Path, dims: &[usize], data: &[u8], gzip: bool) -> Result<()> {
    let bytes = idx_bytes(dims, data, path)?;
    let bytes: Cow<[u8]> = if gzip {
        Cow::Owned(gzip_bytes(&bytes))
    } else {
        Cow::Borrowed(&bytes)
    };
    std::fs::write(path, &bytes).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let p = Path::new("mem");
        let bytes = idx_bytes(&[2, 3], &[1, 2, 3, 4, 5, 6], p).unwrap();
        assert_eq!(&bytes[..4], &[0, 0, 8, 2]);
        let idx = parse_idx(&bytes, p, 2).unwrap();
        assert_eq!(idx.dims, vec![2, 3]);
        assert_eq!(idx.data, vec![1, 2, 3, 4, 5, 6]);
        let idx = parse_idx_owned(gunzip(&gzip_bytes(&bytes), p).unwrap(), p, 2).unwrap();
        assert_eq!(idx.data, vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn overflowing_dims_are_rejected() {
        let mut bytes = vec![0, 0, 8, 3];
        for _ in 0..3 {
            bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        }
        let err = parse_idx(&bytes, Path::new("big"), 3).unwrap_err();
        assert!(err.to_string().contains("overflow"), "{err}");
    }
}
