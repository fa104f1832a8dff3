//! [`Dataset`]: labelled images of shape (C, H, W) held in memory, and [`Split`], a training set
//! and a test set.
//!
//! Pixels are stored as the files hold them: bytes ([`Pixels::U8`], the IDX and CIFAR formats
//! and `uint8` `.npz` arrays) or 32-bit floats ([`Pixels::F32`], `float32` `.npz` arrays). They
//! become `f32` only one mini-batch at a time, in [`Dataset::fill_batch`], into a buffer the
//! caller owns: bytes as `b as f32 / 255.0` (true division, the correctly rounded quotient that
//! PyTorch's `ToTensor` gives), floats as they are. Keeping bytes keeps memory at a quarter of an
//! all-float copy (MNIST 47 MB, CIFAR-10 184 MB).
//!
//! An optional per-channel [`Normalization`] is applied after that conversion, as
//! `(x - mean[c]) / std[c]` in `f32` (torchvision's `Normalize`: a subtraction then a true
//! division). For bytes the 256 possible results per channel are computed once, so normalized
//! batches cost one table look-up per pixel. Without a normalization the output is exactly the
//! converted pixels.

use std::ops::Range;

use super::normalize::Normalization;
use crate::error::{Error, Result};

/// How many images ahead of the one being converted a batch fill prefetches
/// (`Dataset::prefetch_row`).
pub const PREFETCH_ROWS: usize = 4;

crate::kernels::simd_kernel! {
    /// pixels / 255 by true division (not multiplication by 1/255), so each value is the
    /// correctly rounded quotient that PyTorch's `x / 255` gives.
    fn bytes_to_pixels(bytes: &[u8], out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(bytes) {
            *o = b as f32 / 255.0;
        }
    }
}

crate::kernels::simd_kernel! {
    /// `(v - mean) / std` for float pixels.
    fn normalize_values(values: &[f32], mean: f32, std: f32, out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(values) {
            *o = (v - mean) / std;
        }
    }
}

/// The pixel values of every image of a data set, in the element type the file holds.
/// `Debug` shows the type, the count and the first few values, not millions of them.
#[derive(Clone, PartialEq)]
pub enum Pixels {
    /// Bytes 0..=255, converted to `b / 255` when a batch is filled.
    U8(Vec<u8>),
    /// Floats, copied into batches as they are.
    F32(Vec<f32>),
}

impl std::fmt::Debug for Pixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 8;
        let more = if self.len() > SHOWN { ", ..." } else { "" };
        match self {
            Pixels::U8(v) => write!(
                f,
                "U8(len {}: {:?}{more})",
                v.len(),
                &v[..v.len().min(SHOWN)]
            ),
            Pixels::F32(v) => write!(
                f,
                "F32(len {}: {:?}{more})",
                v.len(),
                &v[..v.len().min(SHOWN)]
            ),
        }
    }
}

impl Pixels {
    /// Number of values (images x C x H x W).
    pub fn len(&self) -> usize {
        match self {
            Pixels::U8(v) => v.len(),
            Pixels::F32(v) => v.len(),
        }
    }

    /// True if there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, if the pixels are bytes.
    pub fn as_u8(&self) -> Option<&[u8]> {
        match self {
            Pixels::U8(v) => Some(v),
            Pixels::F32(_) => None,
        }
    }

    /// The floats, if the pixels are floats.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match self {
            Pixels::U8(_) => None,
            Pixels::F32(v) => Some(v),
        }
    }

    /// The element type's name: `"u8"` or `"f32"`.
    pub fn dtype(&self) -> &'static str {
        match self {
            Pixels::U8(_) => "u8",
            Pixels::F32(_) => "f32",
        }
    }
}

/// Labelled images of shape (`channels`, `rows`, `cols`). `images` holds `len()` images one
/// after the other, each channel-major (all of channel 0 row by row, then channel 1, ...), which
/// is the NCHW layout the networks read.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// The pixels, `len() * channels * rows * cols` values.
    pub images: Pixels,
    /// One label per image, each below `classes`.
    pub labels: Vec<u8>,
    /// Channels per image (1 for grey-scale IDX data, 3 for CIFAR-10).
    pub channels: usize,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
    /// Number of classes; every label is below it.
    pub classes: usize,
    /// Applied after conversion in `fill_batch` / `fill_columns`; set through
    /// [`Dataset::set_normalization`], which validates it.
    normalization: Option<Normalization>,
    /// For byte pixels with a normalization: `channels x 256` normalized values.
    lut: Vec<f32>,
}

impl Dataset {
    /// A data set from its parts, checked: `images` must hold `labels.len()` images of `shape`
    /// (C, H, W) and every label must be below `classes` (at most 256, as labels are bytes).
    pub fn new(
        images: Pixels,
        labels: Vec<u8>,
        shape: [usize; 3],
        classes: usize,
    ) -> Result<Dataset> {
        let [c, h, w] = shape;
        let want = [labels.len(), c, h, w]
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d));
        if want != Some(images.len()) {
            return Err(Error::Shape(format!(
                "{} {} pixel values do not make {} images of shape {shape:?}",
                images.len(),
                images.dtype(),
                labels.len()
            )));
        }
        if classes == 0 || classes > 256 {
            return Err(Error::config(
                "classes",
                format!("{classes} (labels are bytes: 1..=256 classes)"),
            ));
        }
        if let Some((i, &v)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &v)| v as usize >= classes)
        {
            return Err(Error::config(
                "labels",
                format!("label at index {i} is {v}, expected 0..{classes}"),
            ));
        }
        Ok(Dataset::from_validated(images, labels, shape, classes))
    }

    /// A data set from parts the caller has already checked as [`Dataset::new`] does.
    pub(crate) fn from_validated(
        images: Pixels,
        labels: Vec<u8>,
        shape: [usize; 3],
        classes: usize,
    ) -> Dataset {
        debug_assert_eq!(images.len(), labels.len() * shape.iter().product::<usize>());
        Dataset {
            images,
            labels,
            channels: shape[0],
            rows: shape[1],
            cols: shape[2],
            classes,
            normalization: None,
            lut: Vec::new(),
        }
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True if there are no examples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Values per image (`channels * rows * cols`): the width of a row of a batch.
    pub fn features(&self) -> usize {
        self.channels * self.rows * self.cols
    }

    /// The shape of one image, `[channels, rows, cols]`.
    pub fn shape(&self) -> [usize; 3] {
        [self.channels, self.rows, self.cols]
    }

    /// The bytes of image `i` (channel-major).
    ///
    /// # Panics
    /// If `i >= len()` or the pixels are floats; indices come from the program, not from user
    /// input, and the caller knows which loader made the data set. Use
    /// [`Dataset::fill_batch`] for either element type.
    pub fn image(&self, i: usize) -> &[u8] {
        let f = self.features();
        match &self.images {
            Pixels::U8(b) => &b[i * f..(i + 1) * f],
            Pixels::F32(_) => panic!("Dataset::image: the pixels are f32, not bytes"),
        }
    }

    /// The normalization applied when batches are filled, if any (per channel, one pair for
    /// each).
    pub fn normalization(&self) -> Option<&Normalization> {
        self.normalization.as_ref()
    }

    /// Sets (or with `None` removes) the normalization `(x - mean[c]) / std[c]` applied after
    /// the conversion to `f32`. It must hold one (mean, std) pair per channel, or a single pair
    /// for all channels (stored expanded to one per channel); every mean finite, every std
    /// finite and above zero. On error the data set is unchanged.
    pub fn set_normalization(&mut self, normalization: Option<Normalization>) -> Result<()> {
        let Some(n) = normalization else {
            self.normalization = None;
            self.lut = Vec::new();
            return Ok(());
        };
        let n = n.for_channels(self.channels)?;
        self.lut = match self.images {
            Pixels::U8(_) => (0..self.channels)
                .flat_map(|c| {
                    let (m, s) = (n.mean[c], n.std[c]);
                    (0..=255u8).map(move |b| (b as f32 / 255.0 - m) / s)
                })
                .collect(),
            Pixels::F32(_) => Vec::new(),
        };
        self.normalization = Some(n);
        Ok(())
    }

    /// Ask the CPU to start loading the values `cols` of image `i` into the cache, so that a
    /// `fill_row` of it a little later does not wait for memory: the images of a shuffled
    /// batch lie anywhere in the data set, and the hardware prefetcher cannot guess the next
    /// one. Only a hint: it changes no value.
    #[inline]
    pub fn prefetch_row(&self, i: usize, cols: Range<usize>) {
        #[cfg(target_arch = "x86_64")]
        {
            let base = i * self.features();
            let (start, end) = (base + cols.start, base + cols.end);
            let hint = |p: *const i8| {
                // SAFETY: prefetching is a hint on a valid address; it reads nothing.
                unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p) }
            };
            // One hint per 64-byte cache line.
            match &self.images {
                Pixels::U8(b) => {
                    let run = b.get(start..end).unwrap_or(&[]);
                    run.chunks(64).for_each(|l| hint(l.as_ptr().cast()));
                }
                Pixels::F32(v) => {
                    let run = v.get(start..end).unwrap_or(&[]);
                    run.chunks(16).for_each(|l| hint(l.as_ptr().cast()));
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (i, cols);
    }

    /// Converts the values `cols` (indices within one image) of image `i` into `out`
    /// (`cols.len()` long), as `fill_batch` does for whole rows.
    pub fn fill_row(&self, i: usize, cols: Range<usize>, out: &mut [f32]) {
        let base = i * self.features();
        let (start, end) = (base + cols.start, base + cols.end);
        match (&self.images, &self.normalization) {
            (Pixels::U8(b), None) => bytes_to_pixels(&b[start..end], out),
            (Pixels::F32(v), None) => out.copy_from_slice(&v[start..end]),
            (pixels, Some(norm)) => {
                let plane = self.rows * self.cols;
                let mut j = cols.start;
                while j < cols.end {
                    // One channel's part of the range at a time.
                    let c = j / plane;
                    let stop = ((c + 1) * plane).min(cols.end);
                    let o = &mut out[j - cols.start..stop - cols.start];
                    match pixels {
                        Pixels::U8(b) => {
                            let table: &[f32; 256] = self.lut[c * 256..(c + 1) * 256]
                                .try_into()
                                .expect("the table has 256 entries per channel");
                            for (o, &b) in o.iter_mut().zip(&b[base + j..base + stop]) {
                                *o = table[b as usize];
                            }
                        }
                        Pixels::F32(v) => normalize_values(
                            &v[base + j..base + stop],
                            norm.mean[c],
                            norm.std[c],
                            o,
                        ),
                    }
                    j = stop;
                }
            }
        }
    }

    /// Panics unless the normalization (if any) still fits the channel count and element type;
    /// the public fields can be changed after `set_normalization`.
    fn check_normalization(&self) {
        if let Some(n) = &self.normalization {
            assert!(
                n.mean.len() == self.channels
                    && (matches!(self.images, Pixels::F32(_))
                        || self.lut.len() == 256 * self.channels),
                "Dataset: the normalization no longer fits the data; call set_normalization again"
            );
        }
    }

    /// Like `fill_batch` for the values `cols` of each row only (labels untouched): lets two
    /// threads each convert the part of every image that their half of the input layer reads.
    pub fn fill_columns(&self, indices: &[usize], x: &mut [f32], cols: Range<usize>) {
        let f = self.features();
        assert!(
            cols.start <= cols.end && cols.end <= f && x.len() >= indices.len() * f,
            "fill_columns: bad range"
        );
        self.check_normalization();
        for (&i, xr) in indices.iter().zip(x.chunks_exact_mut(f)) {
            self.fill_row(i, cols.clone(), &mut xr[cols.clone()]);
        }
    }

    /// Copies the examples `indices` into a batch: the first `indices.len()` rows of `x`
    /// (row-major, `features()` wide, each row one image in C, H, W order) get the pixels as
    /// `f32` (bytes / 255, floats as they are), normalized if a normalization is set; `y` gets
    /// the labels. Does not allocate.
    ///
    /// # Panics
    /// If `x` or `y` is too short or an index is out of range: these are bugs in the caller,
    /// not bad input.
    pub fn fill_batch(&self, indices: &[usize], x: &mut [f32], y: &mut [usize]) {
        let f = self.features();
        assert!(
            x.len() >= indices.len() * f,
            "fill_batch: x has {} floats, need {} examples x {f} features",
            x.len(),
            indices.len()
        );
        assert!(
            y.len() >= indices.len(),
            "fill_batch: y has {} labels, need {}",
            y.len(),
            indices.len()
        );
        self.check_normalization();
        for (r, ((&i, xr), yr)) in indices
            .iter()
            .zip(x.chunks_exact_mut(f))
            .zip(y.iter_mut())
            .enumerate()
        {
            if let Some(&ahead) = indices.get(r + PREFETCH_ROWS) {
                self.prefetch_row(ahead, 0..f);
            }
            self.fill_row(i, 0..f, xr);
            *yr = self.labels[i] as usize;
        }
    }
}

/// A training set and a test set (same image shape and class count).
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// The examples trained on.
    pub train: Dataset,
    /// The examples evaluated on.
    pub test: Dataset,
}

impl Split {
    /// Sets the same normalization on both sets (see [`Dataset::set_normalization`]); usually
    /// statistics of the training set ([`super::channel_stats`]).
    /// On error neither set is changed.
    pub fn set_normalization(&mut self, normalization: Option<Normalization>) -> Result<()> {
        if self.train.channels != self.test.channels {
            return Err(Error::Shape(format!(
                "training images have {} channels, test images {}",
                self.train.channels, self.test.channels
            )));
        }
        let n = normalization
            .map(|n| n.for_channels(self.train.channels))
            .transpose()?;
        self.train.set_normalization(n.clone())?;
        self.test.set_normalization(n)
    }
}
