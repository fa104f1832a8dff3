//! Data augmentation on filled batches: `crop-flip`, the standard CIFAR recipe (random crop of
//! the image padded by `pad` pixels on each side, then a horizontal flip with probability 1/2;
//! torchvision's `RandomCrop(H, padding=pad)` + `RandomHorizontalFlip()`).
//!
//! It works in place on the `f32` batch that [`super::Dataset::fill_batch`] wrote (`n` rows of
//! C x H x W values), after conversion and normalization. The padding value is a parameter
//! ([`CropFlip::with_fill`]): 0 (the default) pads with the value 0 of the batch, i.e. the
//! channel mean when a normalization is set; [`super::Normalization::normalized_zero`] pads with
//! what a black pixel becomes, which is exactly torchvision's order (pad, crop and flip the
//! image, then normalize).
//!
//! Randomness: one `next_u64()` of the generator per example, split as bits 0..31 -> vertical
//! offset `dy`, bits 31..62 -> horizontal offset `dx` (each `(v * (2 pad + 1)) >> 31`, so
//! uniform over `0..=2 pad` up to a bias below 2^-20), bit 63 -> flip. The result depends only on
//! the generator's stream, not on the `rand` crate's distribution code, so a seeded
//! `ChaCha8Rng` gives the same crops in every version. Output pixel (c, i, j) is input pixel
//! (c, i + dy - pad, j' + dx - pad) with `j' = W - 1 - j` when flipped and `j` otherwise, or the
//! fill where that lies outside the image.

use rand::RngCore;

use crate::error::{Error, Result};

/// One example's random choice: the crop's top-left corner in the padded image and the flip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropDraw {
    /// Row offset in `0..=2 pad` (`pad` means no vertical shift).
    pub dy: usize,
    /// Column offset in `0..=2 pad`.
    pub dx: usize,
    /// Mirror left-right after cropping.
    pub flip: bool,
}

/// Largest padding accepted; the offset arithmetic stays far from overflow below it.
pub const MAX_PAD: usize = 1 << 20;

/// Draws one example's crop and flip from `rng` (one `next_u64()`; see the module doc).
pub fn draw_crop<R: RngCore + ?Sized>(rng: &mut R, pad: usize) -> CropDraw {
    let r = rng.next_u64();
    let k = 2 * pad.min(MAX_PAD) as u64 + 1;
    let low = r & 0x7fff_ffff;
    let mid = (r >> 31) & 0x7fff_ffff;
    CropDraw {
        dy: ((low * k) >> 31) as usize,
        dx: ((mid * k) >> 31) as usize,
        flip: r >> 63 == 1,
    }
}

/// Writes the crop `draw` of `src` (one image of `shape` = C, H, W), padded by `pad` with
/// `fill` (one value per channel, or a single value for all), into `dst`.
///
/// # Panics
/// If `src` or `dst` is not C*H*W long or `fill` has neither 1 nor C values.
pub fn crop_flip_one(
    src: &[f32],
    dst: &mut [f32],
    shape: [usize; 3],
    pad: usize,
    draw: CropDraw,
    fill: &[f32],
) {
    let [c, h, w] = shape;
    let plane = h * w;
    assert!(
        src.len() == c * plane && dst.len() == c * plane,
        "crop_flip_one: buffers must hold one {c}x{h}x{w} image"
    );
    assert!(
        fill.len() == 1 || fill.len() == c,
        "crop_flip_one: {} fill values for {c} channels",
        fill.len()
    );
    // Source row of output row i: i + dy - pad; source column of (unflipped) column j:
    // j + dx - pad. Kept as signed shifts.
    let sy = draw.dy as isize - pad as isize;
    let sx = draw.dx as isize - pad as isize;
    for ch in 0..c {
        let v = fill[ch.min(fill.len() - 1)];
        let (s, d) = (&src[ch * plane..][..plane], &mut dst[ch * plane..][..plane]);
        for (i, drow) in d.chunks_exact_mut(w.max(1)).enumerate().take(h) {
            let y = i as isize + sy;
            if y < 0 || y >= h as isize {
                drow.fill(v);
                continue;
            }
            let srow = &s[y as usize * w..][..w];
            for (j, o) in drow.iter_mut().enumerate() {
                let jj = if draw.flip { w - 1 - j } else { j };
                let x = jj as isize + sx;
                *o = if x < 0 || x >= w as isize {
                    v
                } else {
                    srow[x as usize]
                };
            }
        }
    }
}

/// Random crop and flip of `n` images of `shape` in `x` (row-major, C*H*W per row), padding
/// with 0; `scratch` holds one image and is only grown (so, once sized, no allocation). See
/// [`CropFlip`] for a version that owns its scratch and can pad with other values.
///
/// # Panics
/// If `x` holds fewer than `n` images.
pub fn crop_flip<R: RngCore + ?Sized>(
    x: &mut [f32],
    n: usize,
    shape: [usize; 3],
    pad: usize,
    rng: &mut R,
    scratch: &mut Vec<f32>,
) {
    apply(x, n, shape, pad, rng, scratch, &[0.0]);
}

fn apply<R: RngCore + ?Sized>(
    x: &mut [f32],
    n: usize,
    shape: [usize; 3],
    pad: usize,
    rng: &mut R,
    scratch: &mut Vec<f32>,
    fill: &[f32],
) {
    let f = shape.iter().product::<usize>();
    assert!(
        x.len() >= n * f,
        "crop_flip: x has {} floats, need {n} images of {f}",
        x.len()
    );
    if scratch.len() < f {
        scratch.resize(f, 0.0);
    }
    if f == 0 {
        return;
    }
    let scratch = &mut scratch[..f];
    for img in x.chunks_exact_mut(f).take(n) {
        let draw = draw_crop(rng, pad);
        if draw.dy == pad && draw.dx == pad && !draw.flip {
            continue; // the identity
        }
        scratch.copy_from_slice(img);
        crop_flip_one(scratch, img, shape, pad, draw, fill);
    }
}

/// The `crop-flip` augmentation with its settings and scratch buffer (one image, allocated in
/// [`CropFlip::new`]); [`CropFlip::apply`] then allocates nothing.
#[derive(Debug, Clone)]
pub struct CropFlip {
    shape: [usize; 3],
    pad: usize,
    fill: Vec<f32>,
    scratch: Vec<f32>,
}

impl CropFlip {
    /// Crop-flip for images of `shape` (C, H, W) padded by `pad` pixels (4 in the CIFAR recipe)
    /// with 0. An error if `pad` exceeds [`MAX_PAD`].
    pub fn new(shape: [usize; 3], pad: usize) -> Result<CropFlip> {
        if pad > MAX_PAD {
            return Err(Error::config(
                "padding",
                format!("{pad} pixels (at most {MAX_PAD})"),
            ));
        }
        Ok(CropFlip {
            shape,
            pad,
            fill: vec![0.0],
            scratch: vec![0.0; shape.iter().product()],
        })
    }

    /// Pads with `fill`: one value per channel or one for all (e.g.
    /// [`super::Normalization::normalized_zero`]).
    pub fn with_fill(mut self, fill: &[f32]) -> Result<CropFlip> {
        if !(fill.len() == 1 || fill.len() == self.shape[0]) {
            return Err(Error::config(
                "padding fill",
                format!(
                    "{} values for images of {} channels (give one per channel or one)",
                    fill.len(),
                    self.shape[0]
                ),
            ));
        }
        if let Some(v) = fill.iter().find(|v| !v.is_finite()) {
            return Err(Error::config("padding fill", format!("{v} is not finite")));
        }
        self.fill = fill.to_vec();
        Ok(self)
    }

    /// The image shape it was made for.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// The padding in pixels.
    pub fn pad(&self) -> usize {
        self.pad
    }

    /// Crops and flips the first `n` images of `x` in place, one [`draw_crop`] per image in
    /// order. Does not allocate.
    ///
    /// # Panics
    /// If `x` holds fewer than `n` images.
    pub fn apply<R: RngCore + ?Sized>(&mut self, x: &mut [f32], n: usize, rng: &mut R) {
        apply(
            x,
            n,
            self.shape,
            self.pad,
            rng,
            &mut self.scratch,
            &self.fill,
        );
    }
}
