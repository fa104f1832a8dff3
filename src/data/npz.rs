//! NumPy `.npz` files in the layout of Keras's `mnist.npz` (`np.savez(path, x_train=...,
//! y_train=..., x_test=..., y_test=...)`).
//!
//! # Container
//! An `.npz` is a zip archive of `.npy` members; members may be stored or deflated (what
//! `np.savez` and `np.savez_compressed` write). The four arrays are the members `x_train.npy`,
//! `y_train.npy`, `x_test.npy`, `y_test.npy` (the name without `.npy` is accepted too); other
//! members are ignored.
//!
//! # `.npy` members
//! Magic `\x93NUMPY`, a version byte pair (1.x with a 2-byte header length, 2.x and 3.x with a
//! 4-byte one, little-endian), then a Python dict literal with exactly the keys `descr`,
//! `fortran_order` and `shape`, then the elements. Only C order is read (`fortran_order: True`
//! is refused: save with `np.ascontiguousarray`). The data must be exactly
//! `prod(shape) * itemsize` bytes.
//!
//! # Images (`x_train`, `x_test`)
//! - dtype `uint8` (`|u1`), converted to `b / 255` in batches like IDX data, or `float32`
//!   (`<f4`), used as stored; every float must be finite (a NaN or infinity is refused, naming
//!   the array and the element's index). Both arrays must have the same dtype.
//! - 3-D `(N, H, W)`: one channel.
//! - 4-D: `(N, H, W, C)` (NHWC, what Keras and most NumPy code write) when the last dimension is
//!   1, 3 or 4 and dimension 1 is not; otherwise `(N, C, H, W)` (NCHW, PyTorch's order) when
//!   dimension 1 is 1, 3 or 4; anything else is refused, naming the shape. So `(N, 32, 32, 3)`
//!   is NHWC, `(N, 3, 32, 32)` and the ambiguous `(N, 3, 8, 3)` are NCHW. NHWC is transposed to
//!   NCHW at load, once.
//! - The training and test images must have the same (C, H, W); no dimension may be zero and
//!   each set needs at least one image.
//!
//! # Labels (`y_train`, `y_test`)
//! Shape `(N,)` or `(N, 1)` (Keras's CIFAR files) with N equal to the images' count; dtype
//! `uint8`, `int32` or `int64`; every label in `0..=255`. The number of classes is the largest
//! label in either set plus one, and at least 2: taken from the data rather than fixed at 10 so
//! that other class counts (CIFAR-100, two-class sets) work; a class that appears in neither set
//! above the largest label cannot be known and gets no output.
//!
//! Every problem is an [`Error::Data`] naming the file and the member.

use std::io::{Read, Seek};
use std::path::Path;

use super::dataset::{Dataset, Pixels, Split};
use crate::error::{Error, Result};

/// The element types read from `.npy` members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    /// `|u1`: unsigned bytes.
    U8,
    /// `<f4`: little-endian IEEE single precision.
    F32,
    /// `<i4`: little-endian 32-bit signed integers.
    I32,
    /// `<i8`: little-endian 64-bit signed integers.
    I64,
}

impl NpyDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            NpyDtype::U8 => 1,
            NpyDtype::F32 | NpyDtype::I32 => 4,
            NpyDtype::I64 => 8,
        }
    }

    /// NumPy's name of the type.
    pub fn name(self) -> &'static str {
        match self {
            NpyDtype::U8 => "uint8",
            NpyDtype::F32 => "float32",
            NpyDtype::I32 => "int32",
            NpyDtype::I64 => "int64",
        }
    }
}

/// A decoded `.npy` array: dtype, shape and the raw little-endian element bytes (C order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyArray {
    /// Element type.
    pub dtype: NpyDtype,
    /// Dimensions (empty for a scalar).
    pub shape: Vec<usize>,
    /// `prod(shape) * dtype.size()` bytes.
    pub data: Vec<u8>,
}

/// The four arrays of a data set `.npz`, in the order they are read.
pub const NPZ_MEMBERS: [&str; 4] = ["x_train", "y_train", "x_test", "y_test"];

/// The parsed dict of a `.npy` header.
struct Header {
    descr: String,
    fortran_order: bool,
    shape: Vec<usize>,
}

/// Parses a `.npy` file's bytes. `path` and `member` only label errors.
pub fn parse_npy(bytes: &[u8], path: &Path, member: &str) -> Result<NpyArray> {
    parse_npy_owned(bytes.to_vec(), path, member)
}

/// [`parse_npy`] reusing the buffer for the data.
fn parse_npy_owned(mut bytes: Vec<u8>, path: &Path, member: &str) -> Result<NpyArray> {
    let bad = |msg: String| Error::data(path, format!("{member}: {msg}"));
    const MAGIC: &[u8] = b"\x93NUMPY";
    if bytes.len() < 10 || !bytes.starts_with(MAGIC) {
        let shown: Vec<String> = bytes.iter().take(6).map(|b| format!("{b:02x}")).collect();
        return Err(bad(format!(
            "not a .npy array: bad magic [{}] (expected 93 4e 55 4d 50 59, \"\\x93NUMPY\")",
            shown.join(" ")
        )));
    }
    let (major, minor) = (bytes[6], bytes[7]);
    let (hlen, start): (usize, usize) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        2 | 3 => return Err(bad("truncated .npy header".into())),
        _ => {
            return Err(bad(format!(
                "unsupported .npy format version {major}.{minor} (1.x, 2.x and 3.x are read)"
            )))
        }
    };
    let end = start
        .checked_add(hlen)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| {
            bad(format!(
                "truncated .npy header: it claims {hlen} bytes, the member has {}",
                bytes.len() - start
            ))
        })?;
    let text = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad("the .npy header is not text".into()))?;
    let header = parse_header(text).map_err(|m| bad(format!("bad .npy header {text:?}: {m}")))?;
    if header.fortran_order {
        return Err(bad(
            "Fortran-order (column-major) arrays are not supported; save it in C order \
             (np.ascontiguousarray)"
                .into(),
        ));
    }
    let dtype = match header.descr.as_str() {
        "|u1" | "<u1" | ">u1" | "u1" | "=u1" => NpyDtype::U8,
        "<f4" => NpyDtype::F32,
        "<i4" => NpyDtype::I32,
        "<i8" => NpyDtype::I64,
        d if d.starts_with('>') => {
            return Err(bad(format!(
                "big-endian dtype '{d}' is not supported; save it little-endian \
                 (x.astype(x.dtype.newbyteorder('<')))"
            )))
        }
        d => {
            return Err(bad(format!(
                "unsupported dtype '{d}' (images: uint8 '|u1' or float32 '<f4'; labels: \
                 uint8, int32 '<i4' or int64 '<i8')"
            )))
        }
    };
    let want = header
        .shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {:?} overflows", header.shape)))?;
    let found = bytes.len() - end;
    if found != want {
        return Err(bad(format!(
            "data length mismatch: shape {:?} of {} needs {want} bytes, found {found}",
            header.shape,
            dtype.name()
        )));
    }
    bytes.drain(..end);
    Ok(NpyArray {
        dtype,
        shape: header.shape,
        data: bytes,
    })
}

/// Parses the header dict, e.g. `{'descr': '|u1', 'fortran_order': False, 'shape': (3, 4), }`.
fn parse_header(text: &str) -> std::result::Result<Header, String> {
    let mut p = Cursor {
        s: text.as_bytes(),
        i: 0,
    };
    p.ws();
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        p.ws();
        if p.eat(b'}') {
            break;
        }
        let key = p.string()?;
        p.ws();
        p.expect(b':')?;
        p.ws();
        match key.as_str() {
            "descr" if descr.is_none() => descr = Some(p.string()?),
            "fortran_order" if fortran.is_none() => fortran = Some(p.boolean()?),
            "shape" if shape.is_none() => shape = Some(p.tuple()?),
            "descr" | "fortran_order" | "shape" => return Err(format!("key '{key}' repeated")),
            other => return Err(format!("unexpected key '{other}'")),
        }
        p.ws();
        if p.eat(b'}') {
            break;
        }
        p.expect(b',')?;
    }
    p.ws();
    if p.i != p.s.len() {
        return Err("text after the dict".into());
    }
    match (descr, fortran, shape) {
        (Some(descr), Some(fortran_order), Some(shape)) => Ok(Header {
            descr,
            fortran_order,
            shape,
        }),
        _ => Err("missing key (descr, fortran_order and shape are required)".into()),
    }
}

/// A byte cursor over the header text.
struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(format!("expected '{}' at offset {}", c as char, self.i))
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let q = match self.peek() {
            Some(q @ (b'\'' | b'"')) => q,
            _ => return Err(format!("expected a quoted string at offset {}", self.i)),
        };
        self.i += 1;
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == q {
                let s = String::from_utf8_lossy(&self.s[start..self.i]).into_owned();
                self.i += 1;
                return Ok(s);
            }
            if c == b'\\' {
                return Err("escapes in strings are not supported".into());
            }
            self.i += 1;
        }
        Err("unterminated string".into())
    }
    fn boolean(&mut self) -> std::result::Result<bool, String> {
        for (word, v) in [(&b"True"[..], true), (&b"False"[..], false)] {
            if self.s[self.i..].starts_with(word) {
                self.i += word.len();
                return Ok(v);
            }
        }
        Err(format!("expected True or False at offset {}", self.i))
    }
    fn tuple(&mut self) -> std::result::Result<Vec<usize>, String> {
        self.expect(b'(')?;
        let mut dims = Vec::new();
        loop {
            self.ws();
            if self.eat(b')') {
                break;
            }
            let start = self.i;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.i += 1;
            }
            let digits = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
            if digits.is_empty() {
                return Err(format!("expected a dimension at offset {start}"));
            }
            let d: usize = digits
                .parse()
                .map_err(|_| format!("dimension {digits} is too large"))?;
            dims.push(d);
            self.eat(b'L'); // Python 2's long literal
            self.ws();
            if self.eat(b')') {
                break;
            }
            self.expect(b',')?;
        }
        Ok(dims)
    }
}

/// Reads member `name` (`name.npy` or `name`) of the archive.
fn read_member<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    archive_len: u64,
    path: &Path,
    name: &str,
) -> Result<(String, Vec<u8>)> {
    let npy = format!("{name}.npy");
    let member = if zip.index_for_name(&npy).is_some() {
        npy
    } else if zip.index_for_name(name).is_some() {
        name.to_string()
    } else {
        let names: Vec<String> = zip
            .file_names()
            .take(20)
            .map(|n| n.map(|n| n.into_owned()).unwrap_or_else(|_| "?".into()))
            .collect();
        return Err(Error::data(
            path,
            format!(
                "missing member {npy}: an .npz data set needs x_train, y_train, x_test and \
                 y_test (members found: {})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ),
        ));
    };
    let bad = |msg: String| Error::data(path, format!("{member}: {msg}"));
    let mut file = zip
        .by_name(&member)
        .map_err(|e| bad(format!("cannot read the zip member: {e}")))?;
    let size = file.size();
    // Deflate expands at most ~1032:1: a larger claim is a lie; do not allocate for it.
    let cap = size.min(archive_len.saturating_mul(1032)).min(1 << 32) as usize;
    let mut bytes = Vec::with_capacity(cap);
    (&mut file)
        .take(size.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| bad(format!("corrupt zip member: {e}")))?;
    if bytes.len() as u64 != size {
        return Err(bad(format!(
            "corrupt zip member: {} bytes, the archive says {size}",
            bytes.len()
        )));
    }
    Ok((member, bytes))
}

/// The layout of an image array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageLayout {
    /// `(N, H, W)`, one channel.
    Nhw,
    /// `(N, C, H, W)`.
    Nchw,
    /// `(N, H, W, C)`, transposed at load.
    Nhwc,
}

/// The layout of an image array of `shape` by the rules of the module doc and its (C, H, W),
/// or a message saying why it is not an image array.
pub fn image_layout(shape: &[usize]) -> std::result::Result<(ImageLayout, [usize; 3]), String> {
    let chan = |d: usize| matches!(d, 1 | 3 | 4);
    match *shape {
        [_, h, w] => Ok((ImageLayout::Nhw, [1, h, w])),
        [_, a, h, c] if chan(c) && !chan(a) => Ok((ImageLayout::Nhwc, [c, a, h])),
        [_, c, h, w] if chan(c) => Ok((ImageLayout::Nchw, [c, h, w])),
        [_, _, _, _] => Err(format!(
            "shape {shape:?} has no channel dimension: 4-D images are (N, C, H, W) or \
             (N, H, W, C) with C = 1, 3 or 4"
        )),
        _ => Err(format!(
            "shape {shape:?} is not an image array: expected (N, H, W), (N, C, H, W) or \
             (N, H, W, C)"
        )),
    }
}

/// Turns an image array into pixels in NCHW order; returns them with N and (C, H, W).
fn images_of(a: NpyArray, path: &Path, member: &str) -> Result<(Pixels, usize, [usize; 3])> {
    let bad = |msg: String| Error::data(path, format!("{member}: {msg}"));
    let (layout, chw) = image_layout(&a.shape).map_err(bad)?;
    let n = a.shape[0];
    if n == 0 {
        return Err(bad(format!("no images (shape {:?})", a.shape)));
    }
    if chw.contains(&0) {
        return Err(bad(format!("shape {:?} has a zero dimension", a.shape)));
    }
    let pixels = match a.dtype {
        NpyDtype::U8 => Pixels::U8(a.data),
        NpyDtype::F32 => {
            let v: Vec<f32> = a
                .data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
                let f: usize = chw.iter().product();
                return Err(bad(format!(
                    "value {x} at flat index {i} (image {}) is not finite; images must hold \
                     finite numbers",
                    i / f
                )));
            }
            Pixels::F32(v)
        }
        other => {
            return Err(bad(format!(
                "images of dtype {} are not supported (uint8 or float32)",
                other.name()
            )))
        }
    };
    let pixels = match layout {
        ImageLayout::Nhwc => match pixels {
            Pixels::U8(v) => Pixels::U8(nhwc_to_nchw(&v, n, chw)),
            Pixels::F32(v) => Pixels::F32(nhwc_to_nchw(&v, n, chw)),
        },
        _ => pixels,
    };
    Ok((pixels, n, chw))
}

/// Reorders `n` images from (H, W, C) to (C, H, W).
fn nhwc_to_nchw<T: Copy + Default>(v: &[T], n: usize, [c, h, w]: [usize; 3]) -> Vec<T> {
    let f = c * h * w;
    let mut out = vec![T::default(); n * f];
    for (src, dst) in v.chunks_exact(f).zip(out.chunks_exact_mut(f)) {
        for (p, px) in src.chunks_exact(c).enumerate() {
            for (ch, &x) in px.iter().enumerate() {
                dst[ch * h * w + p] = x;
            }
        }
    }
    out
}

/// Turns a label array into bytes.
fn labels_of(a: NpyArray, path: &Path, member: &str) -> Result<Vec<u8>> {
    let bad = |msg: String| Error::data(path, format!("{member}: {msg}"));
    match a.shape[..] {
        [_] | [_, 1] => {}
        _ => {
            return Err(bad(format!(
                "labels must have shape (N,) or (N, 1), found {:?}",
                a.shape
            )))
        }
    }
    let values: Vec<i64> = match a.dtype {
        NpyDtype::U8 => return Ok(a.data),
        NpyDtype::I32 => a
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
            .collect(),
        NpyDtype::I64 => a
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect(),
        NpyDtype::F32 => {
            return Err(bad(
                "labels of dtype float32 are not supported (uint8, int32 or int64)".into(),
            ))
        }
    };
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            u8::try_from(v).map_err(|_| {
                bad(format!(
                    "label at index {i} is {v}; labels must be class numbers 0..=255"
                ))
            })
        })
        .collect()
}

/// Parses an `.npz` data set held in memory (`path` only labels errors).
pub fn parse_npz(bytes: &[u8], path: &Path) -> Result<Split> {
    read_npz(std::io::Cursor::new(bytes), bytes.len() as u64, path)
}

/// Loads an `.npz` data set in Keras's `mnist.npz` layout (see the module doc).
pub fn load_npz(path: &Path) -> Result<Split> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    read_npz(std::io::BufReader::new(file), len, path)
}

fn read_npz<R: Read + Seek>(reader: R, len: u64, path: &Path) -> Result<Split> {
    let mut zip = zip::ZipArchive::new(reader).map_err(|e| {
        Error::data(
            path,
            format!("not a zip archive (an .npz is a zip of .npy arrays): {e}"),
        )
    })?;
    let mut array = |name: &str| -> Result<(String, NpyArray)> {
        let (member, bytes) = read_member(&mut zip, len, path, name)?;
        let a = parse_npy_owned(bytes, path, &member)?;
        Ok((member, a))
    };
    let (xtr_name, xtr) = array("x_train")?;
    let (ytr_name, ytr) = array("y_train")?;
    let (xte_name, xte) = array("x_test")?;
    let (yte_name, yte) = array("y_test")?;
    let (train_dtype, test_dtype) = (xtr.dtype, xte.dtype);
    let (train_px, n_train, shape) = images_of(xtr, path, &xtr_name)?;
    let (test_px, n_test, test_shape) = images_of(xte, path, &xte_name)?;
    if train_dtype != test_dtype {
        return Err(Error::data(
            path,
            format!(
                "{xte_name} is {} but {xtr_name} is {}: both must have the same dtype",
                test_dtype.name(),
                train_dtype.name()
            ),
        ));
    }
    if shape != test_shape {
        return Err(Error::data(
            path,
            format!(
                "{xte_name} holds images of shape (C, H, W) = {test_shape:?} but {xtr_name} \
                 holds {shape:?}"
            ),
        ));
    }
    let train_labels = labels_of(ytr, path, &ytr_name)?;
    let test_labels = labels_of(yte, path, &yte_name)?;
    for (n, labels, x, y) in [
        (n_train, &train_labels, &xtr_name, &ytr_name),
        (n_test, &test_labels, &xte_name, &yte_name),
    ] {
        if labels.len() != n {
            return Err(Error::data(
                path,
                format!(
                    "count mismatch: {x} holds {n} images but {y} holds {} labels",
                    labels.len()
                ),
            ));
        }
    }
    let max = train_labels
        .iter()
        .chain(&test_labels)
        .copied()
        .max()
        .unwrap_or(0);
    let classes = (max as usize + 1).max(2);
    Ok(Split {
        train: Dataset::from_validated(train_px, train_labels, shape, classes),
        test: Dataset::from_validated(test_px, test_labels, shape, classes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_dicts() {
        let h = parse_header("{'descr': '|u1', 'fortran_order': False, 'shape': (3, 4), }   \n")
            .unwrap();
        assert_eq!(
            (h.descr.as_str(), h.fortran_order, h.shape),
            ("|u1", false, vec![3, 4])
        );
        let h =
            parse_header("{\"shape\": (7,), \"fortran_order\": True, \"descr\": \"<f4\"}").unwrap();
        assert_eq!(
            (h.descr.as_str(), h.fortran_order, h.shape),
            ("<f4", true, vec![7])
        );
        assert_eq!(
            parse_header("{'descr':'<i8','fortran_order':False,'shape':()}")
                .unwrap()
                .shape,
            Vec::<usize>::new()
        );
        assert_eq!(
            parse_header("{'descr':'<i8','fortran_order':False,'shape':(2L, 3L)}")
                .unwrap()
                .shape,
            vec![2, 3]
        );
        for bad in [
            "",
            "{",
            "{'descr': '|u1'}",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (3, 4), 'x': 1}",
            "{'descr': '|u1', 'fortran_order': Maybe, 'shape': (3,)}",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (3,-1)}",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (99999999999999999999999,)}",
            "{'descr': '|u1', 'fortran_order': False, 'shape': (3,)} x",
            "{'descr': '|u1', 'descr': '|u1', 'fortran_order': False, 'shape': (3,)}",
        ] {
            assert!(parse_header(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn layouts() {
        use ImageLayout::*;
        assert_eq!(image_layout(&[5, 28, 28]).unwrap(), (Nhw, [1, 28, 28]));
        assert_eq!(image_layout(&[5, 32, 32, 3]).unwrap(), (Nhwc, [3, 32, 32]));
        assert_eq!(image_layout(&[5, 3, 32, 32]).unwrap(), (Nchw, [3, 32, 32]));
        assert_eq!(image_layout(&[5, 1, 28, 28]).unwrap(), (Nchw, [1, 28, 28]));
        assert_eq!(image_layout(&[5, 28, 28, 1]).unwrap(), (Nhwc, [1, 28, 28]));
        assert_eq!(image_layout(&[5, 3, 8, 3]).unwrap(), (Nchw, [3, 8, 3]));
        assert!(image_layout(&[5, 32, 32, 5])
            .unwrap_err()
            .contains("[5, 32, 32, 5]"));
        assert!(image_layout(&[5, 784]).is_err());
        assert!(image_layout(&[]).is_err());
    }

    #[test]
    fn transpose() {
        // One 2x2 image with 3 channels, values = 10 * channel + pixel.
        let hwc: Vec<u8> = (0..4)
            .flat_map(|p| (0..3).map(move |c| 10 * c + p))
            .collect();
        let chw = nhwc_to_nchw(&hwc, 1, [3, 2, 2]);
        assert_eq!(chw, vec![0, 1, 2, 3, 10, 11, 12, 13, 20, 21, 22, 23]);
    }
}
