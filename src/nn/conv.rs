//! 2-D convolution, PyTorch's `nn.Conv2d` (NCHW, square kernel, one stride and one padding for
//! both axes, no dilation or groups).
//!
//! Each example is lowered to a matrix product. `im2col` copies the input patches into a
//! workspace `cols` of shape `[in*k*k, oh*ow]` (row `(c, ki, kj)` holds, for every output
//! position, the input value that kernel tap sees, zero in the padding); then
//!
//! - forward:  `y_i [out, oh*ow] = W [out, in*k*k] x cols_i`, plus the bias per row;
//! - weights:  `dW^T += cols_i x dy_i^T`, summed over the batch (transposed: see `backward_half`);
//! - input:    `dcols = W^T x dy_i`, scattered back onto the input by `col2im` (the adjoint of
//!   `im2col`: each column entry is added to the input pixel it was copied from).
//!
//! A 1x1 convolution with stride 1 and no padding needs no lowering: the input `[in, h*w]` is
//! already the matrix. With stride `s > 1` (ResNet's projection shortcuts) the lowering is a
//! subsampling: `cols [in, oh*ow]` holds every `s`-th pixel of every `s`-th row, and `col2im`
//! puts each entry back on its pixel (the others get no gradient). A 3x3 convolution with
//! stride 2 and padding 1 (ResNet's downsampling) first splits each input plane into its four
//! phases (even/odd rows x even/odd columns, each `oh x ow`); every kernel tap then reads one
//! phase shifted by 0 or 1 row and column, as one flat masked run like the same-size 3x3 path.
//!
//! Threads: the forward pass and the input gradient cut the batch into one block of examples
//! per thread, each with its own workspace (an example's output depends on it alone). The
//! weight gradient is summed over the same two halves of the batch whatever the thread count,
//! each half's examples in order; with more than two threads each half's sum is further split
//! by rows (blocks of input channels, lowered on their own), which leaves every element's
//! chain of multiply-adds as it is. The two partial sums are added at the end in the same
//! order, so results do not depend on the thread count.

use super::winograd;
use super::{check_forward, Ctx, Layer, TensorMut};
use crate::kernels::matmul::{
    matmul, matmul_as, runs_small, small_gemm_rows, Stride, Table, Trans,
};
use crate::kernels::{ordered_sums_f64, par_for, par_ranges, part, pieces, Disjoint};
use crate::{Error, Result};

/// Output length along one axis: `floor((len + 2p - k) / s) + 1`, as PyTorch (no ceil mode).
/// An error (`Error::Shape`, saying what is wrong) for a zero kernel, stride or input length,
/// or a kernel larger than the padded input.
pub(crate) fn out_len(len: usize, k: usize, stride: usize, padding: usize) -> Result<usize> {
    if k == 0 {
        return Err(Error::Shape("kernel size 0".into()));
    }
    if stride == 0 {
        return Err(Error::Shape("stride 0".into()));
    }
    if len == 0 {
        return Err(Error::Shape("input of size 0".into()));
    }
    let padded = padding
        .checked_mul(2)
        .and_then(|p2| p2.checked_add(len))
        .ok_or_else(|| Error::Shape(format!("padding {padding} too large")))?;
    if padded < k {
        return Err(Error::Shape(format!(
            "kernel {k} larger than the padded input {len} + 2*{padding}"
        )));
    }
    Ok((padded - k) / stride + 1)
}

/// `Error::Shape` for a layer: its description, then what is wrong (`msg`, or the message of
/// the shape error `cause` with `context` before it).
pub(crate) fn shape_error(layer: &str, context: &str, cause: Error) -> Error {
    let msg = match cause {
        Error::Shape(m) => m,
        other => other.to_string(),
    };
    Error::Shape(format!("{layer}: {context}{msg}"))
}

/// `a * b * ...` or an error naming `what` when the product overflows.
pub(crate) fn checked_product(factors: &[usize], what: &str) -> Result<usize> {
    factors
        .iter()
        .try_fold(1usize, |acc, &f| acc.checked_mul(f))
        .ok_or_else(|| Error::Shape(format!("{what} too large ({factors:?})")))
}

/// The output positions `o` in `[lo, hi)` whose tap `t` lands inside the input, i.e.
/// `0 <= o*stride + t - padding < len`; outside it the tap reads padding.
pub(crate) fn valid_range(
    t: usize,
    stride: usize,
    padding: usize,
    len: usize,
    olen: usize,
) -> (usize, usize) {
    let lo = if t >= padding {
        0
    } else {
        (padding - t).div_ceil(stride)
    };
    // First o with o*stride + t >= len + padding.
    let hi = (len + padding).saturating_sub(t).div_ceil(stride);
    let hi = hi.min(olen);
    (lo.min(hi), hi)
}

/// The shape of one convolution, copied into the per-half workers.
#[derive(Clone, Copy, Debug)]
struct Geom {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    oh: usize,
    ow: usize,
}

impl Geom {
    /// 3x3, stride 1, padding 1 on a map small enough for the flat paths.
    fn same3(&self) -> bool {
        self.k == 3
            && self.s == 1
            && self.p == 1
            && self.h >= 2
            && self.w >= 2
            && self.h * self.w <= SAME3_MAX_HW
    }
    fn pointwise(&self) -> bool {
        self.k == 1 && self.s == 1 && self.p == 0
    }
    /// 3x3, stride 2, padding 1 with an output small enough for the flat phase paths.
    fn down3(&self) -> bool {
        self.k == 3 && self.s == 2 && self.p == 1 && self.oh * self.ow <= SAME3_MAX_HW
    }
    /// 1x1, stride above 1, no padding: the lowering only subsamples.
    fn subsample(&self) -> bool {
        self.k == 1 && self.s > 1 && self.p == 0
    }
    fn ckk(&self) -> usize {
        self.c * self.k * self.k
    }
}

/// `cols [c*k*k, oh*ow]` from one example `x [c, h, w]`.
fn im2col(g: Geom, x: &[f32], cols: &mut [f32]) {
    if g.same3() {
        im2col_same3(g, x, cols)
    } else if g.down3() {
        im2col_down3(g, x, cols)
    } else if g.subsample() {
        im2col_subsample(g, x, cols)
    } else {
        im2col_general(g, x, cols)
    }
}

/// Largest map (`h * w`) of the flat 3x3 paths, whose masks live on the stack.
const SAME3_MAX_HW: usize = 1024;

/// For the flat 3x3 paths: per kernel column `kj`, all ones where output column `ox` reads
/// inside the input row (`0 <= ox + kj - 1 < w`), else zero; one entry per output pixel.
#[allow(clippy::needless_range_loop)]
fn column_masks(w: usize, hw: usize) -> [[u32; SAME3_MAX_HW]; 3] {
    let mut m = [[0u32; SAME3_MAX_HW]; 3];
    for i in 0..hw {
        let ox = i % w;
        m[0][i] = if ox >= 1 { u32::MAX } else { 0 };
        m[1][i] = u32::MAX;
        m[2][i] = if ox + 1 < w { u32::MAX } else { 0 };
    }
    m
}

/// The output rows `[oy0, oy1)` whose tap `ki` lands inside a 3x3, stride 1, padding 1 input.
fn same3_rows(ki: usize, h: usize) -> (usize, usize) {
    (usize::from(ki == 0), if ki == 2 { h - 1 } else { h })
}

crate::simd_kernel! {
    /// `im2col` for a 3x3 kernel, stride 1, padding 1 (the output has the input's size): row
    /// `(c, ki, kj)` of `cols` is plane `c` shifted by `(ki - 1) * w + kj - 1` positions, as one
    /// flat run, with the entries that wrapped around a row end masked to zero. The planes of
    /// the presets are small (7x7 to 28x28), so this beats copying row by row.
    fn im2col_same3(g: Geom, x: &[f32], cols: &mut [f32]) {
        let (h, w) = (g.h, g.w);
        let hw = h * w;
        let masks = column_masks(w, hw);
        let mut rows = cols[..g.ckk() * hw].chunks_exact_mut(hw);
        for c in 0..g.c {
            let xc = &x[c * hw..][..hw];
            for ki in 0..3 {
                let (oy0, oy1) = same3_rows(ki, h);
                for (kj, mask) in masks.iter().enumerate() {
                    let row = rows.next().expect("cols has c*9 rows");
                    let (o0, o1) = (oy0 * w, oy1 * w);
                    let (a, b, off) = same3_run(o0, o1, ki, kj, w, hw);
                    row[..a].fill(0.0);
                    row[b..].fill(0.0);
                    let src = &xc[a + off - w - 1..][..b - a];
                    for ((r, &v), &m) in row[a..b].iter_mut().zip(src).zip(&mask[a..b]) {
                        *r = f32::from_bits(v.to_bits() & m);
                    }
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// The 3x3, stride 1, padding 1 lowering without its 9-fold copy: per channel, three
    /// copies of the plane shifted by `kj - 1` columns (the entries shifted in from outside
    /// the row zero), each with a zero row above and below: `[c, 3, h + 2, w]`. Row
    /// `(c, ki, kj)` of `im2col_same3`'s matrix is the window of copy `(c, kj)` starting at
    /// row `ki` (`shift3_rows`), with the same values.
    fn shift3(g: Geom, x: &[f32], out: &mut [f32]) {
        let (h, w) = (g.h, g.w);
        let hw = h * w;
        let plane = (h + 2) * w;
        for c in 0..g.c {
            let xc = &x[c * hw..][..hw];
            for kj in 0..3 {
                let o = &mut out[(c * 3 + kj) * plane..][..plane];
                o[..w].fill(0.0);
                o[(h + 1) * w..].fill(0.0);
                // The plane as one flat run shifted by `kj - 1`, then the entries that came
                // from the neighbouring row zeroed: one long copy instead of one per row.
                let body = &mut o[w..(h + 1) * w];
                match kj {
                    0 => {
                        body[1..].copy_from_slice(&xc[..hw - 1]);
                        for v in body.iter_mut().step_by(w) {
                            *v = 0.0;
                        }
                    }
                    1 => body.copy_from_slice(xc),
                    _ => {
                        body[..hw - 1].copy_from_slice(&xc[1..]);
                        for v in body[w - 1..].iter_mut().step_by(w) {
                            *v = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// Where each row `(c, ki, kj)` of the 3x3 lowering starts in `shift3`'s buffer (`c` rows of
/// 9): copy `(c, kj)`, row `ki`.
fn shift3_rows(c: usize, h: usize, w: usize) -> Vec<usize> {
    let plane = (h + 2) * w;
    (0..c * 9)
        .map(|r| {
            let (ch, ki, kj) = (r / 9, r % 9 / 3, r % 3);
            (ch * 3 + kj) * plane + ki * w
        })
        .collect()
}

/// For tap `(ki, kj)` of the flat 3x3 paths, output pixel `o` reads input `o + off - w - 1`
/// (`off = ki * w + kj`). Returns the outputs `[a, b)` inside `[o0, o1)` whose input index lies
/// in the plane, and `off`; those outside it are at a row end, where the mask is zero anyway.
fn same3_run(
    o0: usize,
    o1: usize,
    ki: usize,
    kj: usize,
    w: usize,
    hw: usize,
) -> (usize, usize, usize) {
    let off = ki * w + kj;
    // o + off >= w + 1 and o + off - w - 1 < hw.
    let a = o0.max((w + 1).saturating_sub(off));
    let b = o1.min(hw + w + 1 - off).max(a);
    (a, b, off)
}

/// `im2col` for any geometry. Writes every element of `cols` once, row by row (contiguous),
/// with plain copies for stride 1.
fn im2col_general(g: Geom, x: &[f32], cols: &mut [f32]) {
    let (ohw, hw) = (g.oh * g.ow, g.h * g.w);
    let mut rows = cols[..g.ckk() * ohw].chunks_exact_mut(ohw);
    for c in 0..g.c {
        let xc = &x[c * hw..][..hw];
        for ki in 0..g.k {
            let (oy0, oy1) = valid_range(ki, g.s, g.p, g.h, g.oh);
            for kj in 0..g.k {
                let row = rows.next().expect("cols has c*k*k rows");
                let (ox0, ox1) = valid_range(kj, g.s, g.p, g.w, g.ow);
                row[..oy0 * g.ow].fill(0.0);
                row[oy1 * g.ow..].fill(0.0);
                for oy in oy0..oy1 {
                    let r = &mut row[oy * g.ow..][..g.ow];
                    let xr = &xc[(oy * g.s + ki - g.p) * g.w..][..g.w];
                    r[..ox0].fill(0.0);
                    r[ox1..].fill(0.0);
                    if ox0 == ox1 {
                        continue;
                    }
                    let ix0 = ox0 * g.s + kj - g.p;
                    if g.s == 1 {
                        r[ox0..ox1].copy_from_slice(&xr[ix0..ix0 + (ox1 - ox0)]);
                    } else {
                        for (v, &xv) in r[ox0..ox1].iter_mut().zip(xr[ix0..].iter().step_by(g.s)) {
                            *v = xv;
                        }
                    }
                }
            }
        }
    }
}

/// For the 3x3, stride 2, padding 1 paths: kernel tap `t` (a row or a column) reads input
/// index `2*o + t - 1`, i.e. phase `parity` at index `o - shift`: `(parity, shift)`.
const DOWN3_TAPS: [(usize, usize); 3] = [(1, 1), (0, 0), (1, 0)];

/// One `oh x ow` phase plane per (row parity, column parity), on the stack.
type Phases = [[f32; SAME3_MAX_HW]; 4];

/// All ones where output pixel `o` of an `ow`-wide map is not in column 0, else zero: the
/// taps shifted one column left read padding there.
#[allow(clippy::needless_range_loop)]
fn not_first_column(ow: usize, ohw: usize) -> [u32; SAME3_MAX_HW] {
    let mut m = [0u32; SAME3_MAX_HW];
    for i in 0..ohw {
        m[i] = if i % ow != 0 { u32::MAX } else { 0 };
    }
    m
}

/// For tap `(ki, kj)` of the phase paths: the phase plane read, the flat shift (output `o`
/// reads phase entry `o - shift`), and whether column 0 must be masked.
fn down3_tap(ki: usize, kj: usize, ow: usize) -> (usize, usize, bool) {
    let (a, di) = DOWN3_TAPS[ki];
    let (b, dj) = DOWN3_TAPS[kj];
    (2 * a + b, di * ow + dj, dj == 1)
}

/// Split plane `xc [h, w]` into its four phases: `ph[2a + b][i * ow + j] = xc[2i + a][2j + b]`,
/// zero where that lies outside the plane (odd sizes).
#[inline(always)]
fn split_phases(g: Geom, xc: &[f32], ph: &mut Phases) {
    let (h, w, ow) = (g.h, g.w, g.ow);
    let [p00, p01, p10, p11] = ph;
    for (a, (pe, po)) in [(p00, p01), (p10, p11)].into_iter().enumerate() {
        for i in 0..g.oh {
            let (re, ro) = (&mut pe[i * ow..][..ow], &mut po[i * ow..][..ow]);
            let r = 2 * i + a;
            if r >= h {
                re.fill(0.0);
                ro.fill(0.0);
                continue;
            }
            let xr = &xc[r * w..][..w];
            for ((e, o), pair) in re.iter_mut().zip(ro.iter_mut()).zip(xr.chunks_exact(2)) {
                *e = pair[0];
                *o = pair[1];
            }
            if w % 2 == 1 {
                re[w / 2] = xr[w - 1];
                ro[w / 2] = 0.0;
            }
        }
    }
}

crate::simd_kernel! {
    /// `im2col` for a 3x3 kernel, stride 2, padding 1: per channel, the four phases of the
    /// plane, then row `(c, ki, kj)` of `cols` is one phase shifted by `shift` as a flat run
    /// (zero before it: the rows of padding above), column 0 masked for the taps left of it.
    fn im2col_down3(g: Geom, x: &[f32], cols: &mut [f32]) {
        let (hw, ow, ohw) = (g.h * g.w, g.ow, g.oh * g.ow);
        let mut ph: Phases = [[0.0; SAME3_MAX_HW]; 4];
        let mask = not_first_column(ow, ohw);
        let mut rows = cols[..g.ckk() * ohw].chunks_exact_mut(ohw);
        for c in 0..g.c {
            split_phases(g, &x[c * hw..][..hw], &mut ph);
            for ki in 0..3 {
                for kj in 0..3 {
                    let row = rows.next().expect("cols has c*9 rows");
                    let (plane, shift, masked) = down3_tap(ki, kj, ow);
                    let shift = shift.min(ohw);
                    let src = &ph[plane][..ohw - shift];
                    row[..shift].fill(0.0);
                    let dst = &mut row[shift..];
                    if masked {
                        for ((r, &v), &m) in dst.iter_mut().zip(src).zip(&mask[shift..ohw]) {
                            *r = f32::from_bits(v.to_bits() & m);
                        }
                    } else {
                        dst.copy_from_slice(src);
                    }
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// `col2im` for the geometry of `im2col_down3`: each row of `cols` added, with the same
    /// shift and mask, to its phase's gradient; the four phases then interleaved back into
    /// the plane (every pixel belongs to exactly one phase; phase entries outside the plane
    /// are dropped).
    fn col2im_down3(g: Geom, cols: &[f32], dx: &mut [f32]) {
        let (h, w, hw, ow, ohw) = (g.h, g.w, g.h * g.w, g.ow, g.oh * g.ow);
        let mut ph: Phases = [[0.0; SAME3_MAX_HW]; 4];
        let mask = not_first_column(ow, ohw);
        let mut rows = cols[..g.ckk() * ohw].chunks_exact(ohw);
        for c in 0..g.c {
            for p in &mut ph {
                p[..ohw].fill(0.0);
            }
            for ki in 0..3 {
                for kj in 0..3 {
                    let row = rows.next().expect("cols has c*9 rows");
                    let (plane, shift, masked) = down3_tap(ki, kj, ow);
                    let shift = shift.min(ohw);
                    let dst = &mut ph[plane][..ohw - shift];
                    let src = &row[shift..];
                    if masked {
                        for ((d, &v), &m) in dst.iter_mut().zip(src).zip(&mask[shift..ohw]) {
                            *d += f32::from_bits(v.to_bits() & m);
                        }
                    } else {
                        for (d, &v) in dst.iter_mut().zip(src) {
                            *d += v;
                        }
                    }
                }
            }
            let dc = &mut dx[c * hw..][..hw];
            for (r, dr) in dc.chunks_exact_mut(w).enumerate().take(h) {
                let (a, i) = (r % 2, r / 2);
                let pe = &ph[2 * a][i * ow..][..ow];
                let po = &ph[2 * a + 1][i * ow..][..ow];
                for (pair, (&e, &o)) in dr.chunks_exact_mut(2).zip(pe.iter().zip(po)) {
                    pair[0] = e;
                    pair[1] = o;
                }
                if w % 2 == 1 {
                    dr[w - 1] = pe[w / 2];
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// `im2col` for a 1x1 kernel with stride `s > 1` and no padding: row `c` of `cols` is
    /// plane `c` at rows and columns `0, s, 2s, ...` (every tap lies inside the input).
    fn im2col_subsample(g: Geom, x: &[f32], cols: &mut [f32]) {
        let (ohw, hw) = (g.oh * g.ow, g.h * g.w);
        for (xc, row) in x[..g.c * hw]
            .chunks_exact(hw)
            .zip(cols[..g.c * ohw].chunks_exact_mut(ohw))
        {
            for (oy, r) in row.chunks_exact_mut(g.ow).enumerate() {
                let xr = &xc[oy * g.s * g.w..][..g.w];
                for (v, &xv) in r.iter_mut().zip(xr.iter().step_by(g.s)) {
                    *v = xv;
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// `col2im` for the geometry of `im2col_subsample`: each entry back on the one pixel it was
    /// copied from, every other pixel 0 (no two entries share a pixel).
    fn col2im_subsample(g: Geom, cols: &[f32], dx: &mut [f32]) {
        let (ohw, hw) = (g.oh * g.ow, g.h * g.w);
        dx[..g.c * hw].fill(0.0);
        for (dc, row) in dx[..g.c * hw]
            .chunks_exact_mut(hw)
            .zip(cols[..g.c * ohw].chunks_exact(ohw))
        {
            for (oy, r) in row.chunks_exact(g.ow).enumerate() {
                let dr = &mut dc[oy * g.s * g.w..][..g.w];
                for (d, &v) in dr.iter_mut().step_by(g.s).zip(r) {
                    *d = v;
                }
            }
        }
    }
}

/// `dx [c, h, w] = col2im(cols)`: every column entry added to the input pixel `im2col` took
/// it from (entries that came from padding are dropped).
fn col2im(g: Geom, cols: &[f32], dx: &mut [f32]) {
    if g.same3() {
        col2im_same3(g, cols, dx)
    } else if g.down3() {
        col2im_down3(g, cols, dx)
    } else if g.subsample() {
        col2im_subsample(g, cols, dx)
    } else {
        col2im_general(g, cols, dx)
    }
}

crate::simd_kernel! {
    /// `col2im` for the geometry of `im2col_same3`, with the same flat runs: each row of
    /// `cols`, masked at the row ends, added to the plane shifted back.
    fn col2im_same3(g: Geom, cols: &[f32], dx: &mut [f32]) {
        let (h, w) = (g.h, g.w);
        let hw = h * w;
        let masks = column_masks(w, hw);
        dx[..g.c * hw].fill(0.0);
        let mut rows = cols[..g.ckk() * hw].chunks_exact(hw);
        for c in 0..g.c {
            let dc = &mut dx[c * hw..][..hw];
            for ki in 0..3 {
                let (oy0, oy1) = same3_rows(ki, h);
                for (kj, mask) in masks.iter().enumerate() {
                    let row = rows.next().expect("cols has c*9 rows");
                    let (a, b, off) = same3_run(oy0 * w, oy1 * w, ki, kj, w, hw);
                    let dst = &mut dc[a + off - w - 1..][..b - a];
                    for ((d, &v), &m) in dst.iter_mut().zip(&row[a..b]).zip(&mask[a..b]) {
                        *d += f32::from_bits(v.to_bits() & m);
                    }
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// `col2im` for any geometry. Compiled for AVX2 as a whole, so that the short row
    /// additions (`ow` long) inline instead of dispatching one by one.
    fn col2im_general(g: Geom, cols: &[f32], dx: &mut [f32]) {
        let (ohw, hw) = (g.oh * g.ow, g.h * g.w);
        dx[..g.c * hw].fill(0.0);
        let mut rows = cols[..g.ckk() * ohw].chunks_exact(ohw);
        for c in 0..g.c {
            let dc = &mut dx[c * hw..][..hw];
            for ki in 0..g.k {
                let (oy0, oy1) = valid_range(ki, g.s, g.p, g.h, g.oh);
                for kj in 0..g.k {
                    let row = rows.next().expect("cols has c*k*k rows");
                    let (ox0, ox1) = valid_range(kj, g.s, g.p, g.w, g.ow);
                    if ox0 == ox1 {
                        continue;
                    }
                    let ix0 = ox0 * g.s + kj - g.p;
                    for oy in oy0..oy1 {
                        let r = &row[oy * g.ow + ox0..oy * g.ow + ox1];
                        let dr = &mut dc[(oy * g.s + ki - g.p) * g.w..][..g.w];
                        if g.s == 1 {
                            for (d, &v) in dr[ix0..ix0 + r.len()].iter_mut().zip(r) {
                                *d += v;
                            }
                        } else {
                            for (d, &v) in dr[ix0..].iter_mut().step_by(g.s).zip(r) {
                                *d += v;
                            }
                        }
                    }
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// `out [cols, rows] = (a + b)^T` for row-major `[rows, cols]` matrices `a` and `b`: the
    /// two half-batch weight gradients, summed and turned into the weight's layout.
    fn add_transposed(a: &[f32], b: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
        for r in 0..rows {
            let (ar, br) = (&a[r * cols..][..cols], &b[r * cols..][..cols]);
            for (c, (&x, &y)) in ar.iter().zip(br).enumerate() {
                out[c * rows + r] = x + y;
            }
        }
    }
}

/// Forward for a block of examples.
#[allow(clippy::too_many_arguments)]
fn forward_half(
    g: Geom,
    out_ch: usize,
    weight: &[f32],
    bias: Option<&[f32]>,
    x: &[f32],
    y: &mut [f32],
    cols: &mut [f32],
    shifted: &[usize],
    threads: usize,
) {
    let (isz, ohw) = (g.c * g.h * g.w, g.oh * g.ow);
    let osz = out_ch * ohw;
    let ckk = g.ckk();
    // The 3x3 same-size maps without the 9-fold copy, when the product runs on our kernel
    // anyway (then the bits are those of the lowered matrix) on this one thread.
    let shift = !shifted.is_empty() && threads == 1 && runs_small(out_ch, ckk, ohw, Trans::No);
    for (xi, yi) in x.chunks_exact(isz).zip(y.chunks_exact_mut(osz)) {
        if let Some(bias) = bias {
            for (row, &bv) in yi.chunks_exact_mut(ohw).zip(bias) {
                row.fill(bv);
            }
        }
        if shift {
            shift3(g, xi, cols);
            let (a, b) = (Stride(ckk), Table(shifted));
            small_gemm_rows(yi, weight, a, cols, b, out_ch, ckk, ohw, bias.is_some());
            continue;
        }
        let b: &[f32] = if g.pointwise() {
            xi
        } else {
            im2col(g, xi, cols);
            cols
        };
        // The bias went in first and the product accumulates onto it: one pass over y.
        matmul(
            yi,
            weight,
            b,
            out_ch,
            g.ckk(),
            ohw,
            Trans::No,
            bias.is_some(),
            threads,
        );
    }
}

/// Below this many rows (`in*k*k`) the weight gradient is taken as dot products (`Trans::B`)
/// rather than through a transposed copy of dy: the register tiles of the row-major product
/// need a few rows to be efficient.
const DOT_MAX_CKK: usize = 16;

/// The weight gradient of the examples in `x` (one half of the batch), rows `rows` of it
/// only (the input channels `chans`): `dwt` gets those rows of the transposed gradient
/// (`[in*k*k, out]`, overwritten), summed over the examples in order.
///
/// Why transposed: `dW^T += cols_i x dy_i^T` has the long, contiguous `cols` rows as the left
/// operand, and measured a third faster than `dW += dy_i x cols_i^T` (4.4 against 6.4 ms for a
/// batch of 32 at 32 -> 32 channels, 28x28, 3x3). `dy_i^T` is copied out first (it is small:
/// `out x oh*ow`), so that every product has a row-major right operand and runs on our own
/// allocation-free `small_gemm` rather than the `gemm` crate. The products run on the kernel
/// the whole gradient's shape calls for (`matmul_as`), so a block of rows gets the bits the
/// whole would.
#[allow(clippy::too_many_arguments)]
fn backward_weights(
    g: Geom,
    out_ch: usize,
    x: &[f32],
    dy: &[f32],
    chans: std::ops::Range<usize>,
    ws: &mut [f32],
    dwt: &mut [f32],
    shifted: &[usize],
    wino: bool,
) {
    let (isz, hw, ohw, ckk) = (g.c * g.h * g.w, g.h * g.w, g.oh * g.ow, g.ckk());
    let osz = out_ch * ohw;
    let m = x.len() / isz;
    if m == 0 {
        dwt.fill(0.0);
        return;
    }
    if wino {
        // Summed over the examples in order in Winograd's domain, then turned into the 3x3
        // gradient once (`[16, block, out]` at the start of the workspace).
        let cb = chans.len();
        let (du, rest) = ws.split_at_mut(16 * cb * out_ch);
        for i in 0..m {
            let xi = &x[i * isz + chans.start * hw..][..cb * hw];
            let dyi = &dy[i * osz..][..osz];
            winograd::weight_grad(xi, cb, dyi, out_ch, g.h, g.w, du, i > 0, rest, g.c);
        }
        winograd::grad_filter(du, cb, out_ch, dwt);
        return;
    }
    let gb = Geom {
        c: chans.len(),
        ..g
    };
    let rows = gb.ckk();
    // The workspace holds the patches of the channel block and, after them, dy_i transposed:
    // `[oh*ow, out]`, the right operand of the product in row-major form.
    let patches = if g.pointwise() { 0 } else { rows * ohw };
    let (cols, dyt) = ws.split_at_mut(patches);
    let dyt = &mut dyt[..ohw * out_ch];
    // As in `forward_half`: the channel block's rows are the first of the layer's table.
    let shift =
        !shifted.is_empty() && ckk >= DOT_MAX_CKK && runs_small(ckk, ohw, out_ch, Trans::No);
    for i in 0..m {
        let xi = &x[i * isz + chans.start * hw..][..chans.len() * hw];
        let dyi = &dy[i * osz..][..osz];
        if ckk >= DOT_MAX_CKK {
            transpose(dyi, out_ch, ohw, dyt);
        }
        if shift {
            shift3(gb, xi, cols);
            let (a, b) = (Table(&shifted[..rows]), Stride(out_ch));
            small_gemm_rows(dwt, cols, a, dyt, b, rows, ohw, out_ch, i > 0);
            continue;
        }
        let a: &[f32] = if g.pointwise() {
            xi
        } else {
            // The patches are lowered again rather than kept from the forward pass: cheap next
            // to the products, and the workspace stays one example large.
            im2col(gb, xi, cols);
            cols
        };
        if ckk < DOT_MAX_CKK {
            // Few, long rows (the stem: 9 x 784): dot products of cols and dy rows.
            matmul_as(dwt, a, dyi, rows, ohw, out_ch, Trans::B, i > 0, 1, ckk);
        } else {
            matmul_as(dwt, a, dyt, rows, ohw, out_ch, Trans::No, i > 0, 1, ckk);
        }
    }
}

/// A 3x3 same-size layer's input gradient by taps (see `tap_sums`): dy's shifted-copy rows
/// per tap, and the weights per tap transposed. Empty for other layers.
#[derive(Clone, Copy)]
struct Taps<'a> {
    rows: &'a [usize],
    weights: &'a [f32],
}

/// The input gradients of the examples in `dy` into `dx`: `dcols = W^T dy_i`, then `col2im`;
/// for 3x3 same-size maps on one thread, `tap_sums` over dy's shifted copies instead (the
/// same bits without the lowered matrix).
#[allow(clippy::too_many_arguments)]
fn backward_input(
    g: Geom,
    out_ch: usize,
    weight: &[f32],
    taps: Taps<'_>,
    wino: Option<&[f32]>,
    dy: &[f32],
    dx: &mut [f32],
    cols: &mut [f32],
    threads: usize,
) {
    let (isz, ohw, ckk) = (g.c * g.h * g.w, g.oh * g.ow, g.ckk());
    let osz = out_ch * ohw;
    for (dyi, dxi) in dy.chunks_exact(osz).zip(dx.chunks_exact_mut(isz)) {
        if let Some(ub) = wino {
            // The same-size convolution of dy with the filters turned (`ub`).
            winograd::conv3x3(dyi, out_ch, g.c, g.h, g.w, ub, None, dxi, cols);
        } else if g.pointwise() {
            matmul(dxi, weight, dyi, ckk, out_ch, ohw, Trans::A, false, threads);
        } else if !taps.rows.is_empty() && threads == 1 {
            shift3(Geom { c: out_ch, ..g }, dyi, cols);
            tap_sums(dxi, taps, cols, g.c, out_ch, ohw);
        } else {
            matmul(
                cols,
                weight,
                dyi,
                ckk,
                out_ch,
                ohw,
                Trans::A,
                false,
                threads,
            );
            col2im(g, cols, dxi);
        }
    }
}

/// `dx [c, hw]` of one example of a 3x3, stride 1, padding 1 layer, from dy's shifted copies
/// (`shift3` on dy, in `dyb`): for each tap t in order, the product of that tap's transposed
/// weights `[c, out]` and dy shifted by the tap (rows `taps.rows[t * out..]`), one
/// multiply-add chain over the output channels per element, added to the element's total.
///
/// The same bits as `matmul` (Trans::A, on `small_gemm`) into the lowered matrix followed by
/// `col2im_same3`: there, row (c, t) of the lowered gradient is that same chain at the output
/// pixel the tap reads, and col2im adds the taps to a zeroed plane in the same order. Where the
/// tap reads outside the map, the shifted copy holds zeros: the chain is +0.0, and adding +0.0
/// leaves a total that is never -0.0 unchanged, as col2im's skipping it does.
fn tap_sums(dx: &mut [f32], taps: Taps<'_>, dyb: &[f32], c: usize, out: usize, n: usize) {
    assert!(n >= 8 && dx.len() >= c * n && taps.weights.len() >= 9 * c * out);
    assert!(taps.rows.len() >= 9 * out);
    assert!(taps.rows[..9 * out].iter().all(|&r| r + n <= dyb.len()));
    tap_sums_at_level(dx, taps, dyb, c, out, n)
}

crate::simd_kernel! {
    /// `tap_sums` compiled for each SIMD level: tiles 32 columns wide under AVX-512 (its 32
    /// registers hold a 4 x 32 tile's totals and chains), 8 otherwise.
    fn tap_sums_at_level(dx: &mut [f32], taps: Taps<'_>, dyb: &[f32], c: usize, out: usize, n: usize) {
        if crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512 {
            tap_sums_tiled::<32>(dx, taps, dyb, c, out, n)
        } else {
            tap_sums_tiled::<8>(dx, taps, dyb, c, out, n)
        }
    }
}

/// `tap_sums` in tiles of up to 4 rows and `W` columns, then 16 and 8 for the rest of a row
/// block; the last tile may overlap the one before it (the overlapped elements are recomputed
/// with the same operations, so they get the same values).
#[inline(always)]
fn tap_sums_tiled<const W: usize>(
    dx: &mut [f32],
    taps: Taps<'_>,
    dyb: &[f32],
    c: usize,
    out: usize,
    n: usize,
) {
    let mut r0 = 0;
    while r0 < c {
        let rows = (c - r0).min(4);
        // SAFETY: `tap_sums` checked every row of dy's copies for n values, the weights for
        // 9 * c * out, and dx for c rows of n (n >= 8); every tile lies inside columns 0..n.
        unsafe {
            match rows {
                4 => tap_row_block::<4, W>(dx, taps, dyb, c, out, n, r0),
                3 => tap_row_block::<3, W>(dx, taps, dyb, c, out, n, r0),
                2 => tap_row_block::<2, W>(dx, taps, dyb, c, out, n, r0),
                _ => tap_row_block::<1, W>(dx, taps, dyb, c, out, n, r0),
            }
        }
        r0 += rows;
    }
}

/// The column tiles of rows `r0..r0 + R` (see `tap_sums_tiled`).
///
/// # Safety
/// As `tap_sums_tiled` states.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tap_row_block<const R: usize, const W: usize>(
    dx: &mut [f32],
    taps: Taps<'_>,
    dyb: &[f32],
    c: usize,
    out: usize,
    n: usize,
    r0: usize,
) {
    let mut c0 = 0;
    // SAFETY (all calls): columns c0..c0 + width <= n.
    while c0 + W <= n {
        unsafe { tap_tile::<R, W>(dx, taps, dyb, c, out, n, r0, c0) };
        c0 += W;
    }
    while c0 < n {
        if W > 16 && n - c0 > 8 && n >= 16 {
            let s = c0.min(n - 16);
            unsafe { tap_tile::<R, 16>(dx, taps, dyb, c, out, n, r0, s) };
            c0 = s + 16;
        } else {
            let s = c0.min(n - 8);
            unsafe { tap_tile::<R, 8>(dx, taps, dyb, c, out, n, r0, s) };
            c0 = s + 8;
        }
    }
}

/// Rows `r0..r0 + R`, columns `c0..c0 + W` of `tap_sums`, the totals and each tap's chain in
/// registers.
///
/// # Safety
/// As `tap_sums_tiled` states, and `c0 + W <= n`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tap_tile<const R: usize, const W: usize>(
    dx: &mut [f32],
    taps: Taps<'_>,
    dyb: &[f32],
    c: usize,
    out: usize,
    n: usize,
    r0: usize,
    c0: usize,
) {
    let mut total = [[0f32; W]; R];
    let (wp, bp) = (taps.weights.as_ptr(), dyb.as_ptr());
    for t in 0..9 {
        let mut acc = [[0f32; W]; R];
        let a = t * c * out;
        for oc in 0..out {
            // SAFETY: the caller's contract (row t * out + oc of the table, columns c0..c0+W).
            let bv: [f32; W] = unsafe {
                std::ptr::read_unaligned(bp.add(taps.rows[t * out + oc] + c0) as *const [f32; W])
            };
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: element (t, r0 + r, oc) of the [9, c, out] weights.
                let av = unsafe { *wp.add(a + (r0 + r) * out + oc) };
                for j in 0..W {
                    row[j] = av.mul_add(bv[j], row[j]);
                }
            }
        }
        for (tr, ar) in total.iter_mut().zip(&acc) {
            for j in 0..W {
                tr[j] += ar[j];
            }
        }
    }
    for (r, row) in total.iter().enumerate() {
        dx[(r0 + r) * n + c0..][..W].copy_from_slice(row);
    }
}

/// `out [cols, rows] = a^T` for a row-major `[rows, cols]` matrix `a`: in 16 x 16 blocks
/// transposed in registers under AVX-512 (the blocks at the right and bottom edges partial,
/// with masked loads and stores), element by element on other levels. A copy: the same values
/// either way.
pub(crate) fn transpose(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512 {
        let (a, out) = (&a[..rows * cols], &mut out[..rows * cols]);
        // Blocks cover the rows and columns up to a thin edge (fewer than `MIN_EDGE` left),
        // which is copied element by element: a masked block costs the same as a whole one.
        const MIN_EDGE: usize = 8;
        let covered = |n: usize| if n % 16 >= MIN_EDGE { n } else { n / 16 * 16 };
        let (rb, cb) = (covered(rows), covered(cols));
        for r0 in (0..rb).step_by(16) {
            for c0 in (0..cb).step_by(16) {
                let (nr, nc) = ((rb - r0).min(16), (cb - c0).min(16));
                // SAFETY: the level says the CPU has AVX-512F; the block reads rows
                // r0..r0+nr of `a` at columns c0..c0+nc, and writes rows c0..c0+nc of `out` at
                // columns r0..r0+nr, inside the slices checked above.
                unsafe {
                    let (src, dst) = (
                        a.as_ptr().add(r0 * cols + c0),
                        out.as_mut_ptr().add(c0 * rows + r0),
                    );
                    if nr == 16 && nc == 16 {
                        transpose16_avx512::<true>(src, cols, dst, rows, 16, 16)
                    } else {
                        transpose16_avx512::<false>(src, cols, dst, rows, nr, nc)
                    }
                };
            }
        }
        // The columns right of the blocks, then the rows below them.
        for (r, ar) in a.chunks_exact(cols).enumerate() {
            let from = if r < rb { cb } else { 0 };
            for (c, &v) in ar.iter().enumerate().skip(from) {
                out[c * rows + r] = v;
            }
        }
        return;
    }
    transpose_scalar(a, rows, cols, out)
}

/// A block of up to 16 x 16 f32 transposed in registers: the first `nr` rows of `src` (row
/// stride `ss`), `nc` values each, become the first `nc` rows of `dst` (row stride `ds`), `nr`
/// values each; nothing outside is read or written. Unpacks of 32-bit, then 64-bit pairs within
/// 128-bit lanes give each lane a 4 x 4 transposed piece; two rounds of lane shuffles place
/// them.
///
/// # Safety
/// The CPU has AVX-512F; `nr, nc <= 16`; `src + i * ss .. + nc` is readable for `i < nr` and
/// `dst + j * ds .. + nr` writable for `j < nc`.
/// `FULL`: a whole block (`nr = nc = 16`), with plain loads and stores.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn transpose16_avx512<const FULL: bool>(
    src: *const f32,
    ss: usize,
    dst: *mut f32,
    ds: usize,
    nr: usize,
    nc: usize,
) {
    use crate::kernels::simd::lanes;
    use std::arch::x86_64::*;
    let (nr, nc) = if FULL { (16, 16) } else { (nr, nc) };
    let (load, store) = (lanes(nc), lanes(nr));
    let mut r = [_mm512_setzero_ps(); 16];
    for (i, v) in r.iter_mut().enumerate() {
        // SAFETY: the caller's contract (row i < nr, the first nc values).
        if FULL {
            *v = unsafe { _mm512_loadu_ps(src.add(i * ss)) };
        } else if i < nr {
            *v = unsafe { _mm512_maskz_loadu_ps(load, src.add(i * ss)) };
        }
    }
    // t[2i] lane L: a[2i][4L], a[2i+1][4L], a[2i][4L+1], a[2i+1][4L+1]; t[2i+1]: the next two.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // u[4g + k] lane L: column 4L + k, rows 4g .. 4g + 4.
    let mut u = [_mm512_setzero_ps(); 16];
    for g in 0..4 {
        let pd = |v: __m512| _mm512_castps_pd(v);
        let (a, b, c, d) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
        u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    // For each k, the 4 x 4 transpose of 128-bit lanes of u[k], u[4 + k], u[8 + k], u[12 + k]:
    // lane L of the result is column 4L + k, all 16 rows.
    for k in 0..4 {
        let (v0, v1, v2, v3) = (u[k], u[4 + k], u[8 + k], u[12 + k]);
        let s0 = _mm512_shuffle_f32x4::<0x44>(v0, v1);
        let s1 = _mm512_shuffle_f32x4::<0xEE>(v0, v1);
        let s2 = _mm512_shuffle_f32x4::<0x44>(v2, v3);
        let s3 = _mm512_shuffle_f32x4::<0xEE>(v2, v3);
        let w = [
            _mm512_shuffle_f32x4::<0x88>(s0, s2),
            _mm512_shuffle_f32x4::<0xDD>(s0, s2),
            _mm512_shuffle_f32x4::<0x88>(s1, s3),
            _mm512_shuffle_f32x4::<0xDD>(s1, s3),
        ];
        for (l, &v) in w.iter().enumerate() {
            // SAFETY: the caller's contract (row 4l + k < nc of dst, its first nr values).
            if FULL {
                unsafe { _mm512_storeu_ps(dst.add((4 * l + k) * ds), v) };
            } else if 4 * l + k < nc {
                unsafe { _mm512_mask_storeu_ps(dst.add((4 * l + k) * ds), store, v) };
            }
        }
    }
}

crate::simd_kernel! {
    /// `transpose`, element by element.
    fn transpose_scalar(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
        for (r, ar) in a[..rows * cols].chunks_exact(cols).enumerate() {
            for (c, &v) in ar.iter().enumerate() {
                out[c * rows + r] = v;
            }
        }
    }
}

/// A 2-D convolution on NCHW maps: `n x (in_ch * in_h * in_w)` in, `n x (out_ch * out_h *
/// out_w)` out (see the module doc).
///
/// Works without `reserve` (its workspace, one example large, is sized by the first pass);
/// `backward` computes the gradients at the `x` it is given, whatever was forwarded before.
pub struct Conv2d {
    /// Input channels.
    pub in_ch: usize,
    /// Output channels (filters).
    pub out_ch: usize,
    /// Kernel size (square).
    pub k: usize,
    /// Stride along both axes.
    pub stride: usize,
    /// Zero padding on each side of both axes.
    pub padding: usize,
    /// Input height.
    pub in_h: usize,
    /// Input width.
    pub in_w: usize,
    /// Output height, `(in_h + 2 padding - k) / stride + 1`.
    pub out_h: usize,
    /// Output width, `(in_w + 2 padding - k) / stride + 1`.
    pub out_w: usize,
    /// `[out, in, k, k]`, PyTorch's layout; row-major it is the `[out, in*k*k]` matrix of the
    /// product, one filter per row.
    pub weight: Vec<f32>,
    /// One per output channel; `None` for `bias=False`.
    pub bias: Option<Vec<f32>>,
    grad_weight: Vec<f32>,
    grad_bias: Option<Vec<f32>>,
    /// Each half-batch's partial weight gradient, transposed (`[in*k*k, out]`).
    grad_wt: [Vec<f32>; 2],
    /// One workspace (patches, then one example's dy transposed) per piece of a parallel
    /// pass, grown to the most pieces a pass has used.
    cols: Vec<Vec<f32>>,
    /// For 3x3 same-size maps: where each row of the lowering starts in `shift3`'s buffer
    /// (empty for other geometries).
    shifted: Vec<usize>,
    /// For 3x3 same-size maps whose input gradient runs on our kernel: where row `oc` of tap
    /// `t`'s shifted dy starts in `shift3`'s buffer of dy (`[9, out]`; empty otherwise), and
    /// the weights per tap, transposed (`[9, in, out]`, refreshed every backward pass).
    tap_rows: Vec<usize>,
    tap_weights: Vec<f32>,
    /// The bias gradient's per-example, per-channel sums (`[n, out]`), sized by `reserve` or
    /// the first backward pass of a larger batch.
    bias_sums: Vec<f64>,
    /// How the 3x3 same-size products are computed (`ConvAlgo`).
    algo: ConvAlgo,
    /// Under `ConvAlgo::Winograd`: the transformed filters of the forward pass
    /// (`[16, in, out]`) and of the input gradient (`[16, out, in]`), refreshed every pass.
    wino_u: Vec<f32>,
    wino_ub: Vec<f32>,
}

/// How a convolution computes its 3x3, stride 1, padding 1 products (other geometries are
/// computed directly whatever the choice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvAlgo {
    /// The product of the filters and the lowered input (shifted windows): every output a
    /// multiply-add chain over the input channels and taps, the same bits as ever. The
    /// library's default, and the reproductions' (their committed numbers are this one's).
    #[default]
    Direct,
    /// Winograd's F(2x2, 3x3) (`nn::winograd`) for the forward pass, the input gradient and
    /// the weight gradient of layers with at least `WINOGRAD_MIN_IN` input channels: 2.25
    /// times fewer multiplications; results differ from `Direct` by rounding (a few units in
    /// the last place of the terms' magnitude). Bit-identical across thread counts and SIMD
    /// levels all the same.
    Winograd,
}

impl ConvAlgo {
    /// The name the command line takes: `direct` or `winograd`.
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Direct => "direct",
            ConvAlgo::Winograd => "winograd",
        }
    }

    /// The algorithm of a name (`direct` or `winograd`).
    pub fn parse(s: &str) -> Option<ConvAlgo> {
        [ConvAlgo::Direct, ConvAlgo::Winograd]
            .into_iter()
            .find(|a| a.name() == s)
    }
}

/// The fewest input channels (of the forward pass) for which `ConvAlgo::Winograd` is used: with
/// fewer, the transforms cost more than the multiplications they save (the ResNet stem's one
/// channel).
pub const WINOGRAD_MIN_IN: usize = 4;

impl Conv2d {
    /// Zero-initialized; presets fill the weights. `in_h x in_w` is the input's spatial size.
    ///
    /// An error (`Error::Shape`, saying what is wrong) for zero channels, kernel, stride or
    /// input size, a kernel larger than the padded input, or sizes whose products overflow.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        k: usize,
        stride: usize,
        padding: usize,
        bias: bool,
        in_h: usize,
        in_w: usize,
    ) -> Result<Self> {
        let what = format!(
            "Conv2d({in_ch}, {out_ch}, kernel_size={k}, stride={stride}, padding={padding}) \
             on {in_h}x{in_w}"
        );
        let err = |context: &str, e: Error| shape_error(&what, context, e);
        if in_ch == 0 || out_ch == 0 {
            return Err(err("", Error::Shape("0 channels".into())));
        }
        let out_h = out_len(in_h, k, stride, padding).map_err(|e| err("height: ", e))?;
        let out_w = out_len(in_w, k, stride, padding).map_err(|e| err("width: ", e))?;
        let wlen = checked_product(&[out_ch, in_ch, k, k], "weight").map_err(|e| err("", e))?;
        // Every per-example buffer size the layer computes must be representable.
        checked_product(&[in_ch, in_h, in_w], "input").map_err(|e| err("", e))?;
        // (in*k*k <= the weight's length, checked above.)
        checked_product(&[out_ch.max(in_ch * k * k), out_h, out_w], "output")
            .map_err(|e| err("", e))?;
        Ok(Conv2d {
            in_ch,
            out_ch,
            k,
            stride,
            padding,
            in_h,
            in_w,
            out_h,
            out_w,
            weight: vec![0.0; wlen],
            bias: bias.then(|| vec![0.0; out_ch]),
            grad_weight: vec![0.0; wlen],
            grad_bias: bias.then(|| vec![0.0; out_ch]),
            grad_wt: [vec![0.0; wlen], vec![0.0; wlen]],
            cols: Vec::new(),
            shifted: Vec::new(),
            tap_rows: Vec::new(),
            tap_weights: Vec::new(),
            bias_sums: Vec::new(),
            algo: ConvAlgo::Direct,
            wino_u: Vec::new(),
            wino_ub: Vec::new(),
        }
        .with_shift_rows())
    }

    /// Set the weight from PyTorch's `[out, in, k, k]` layout (the storage layout too).
    pub fn set_weight(&mut self, w: &[f32]) {
        self.weight.copy_from_slice(w);
    }

    /// The weight gradient of the last backward pass, `[out, in, k, k]`.
    pub fn grad_weight(&self) -> &[f32] {
        &self.grad_weight
    }

    /// The bias gradient of the last backward pass, one per output channel; `None` without a
    /// bias.
    pub fn grad_bias(&self) -> Option<&[f32]> {
        self.grad_bias.as_deref()
    }

    /// Compute the 3x3 same-size products with `algo` from the next pass on.
    pub fn set_algo(&mut self, algo: ConvAlgo) {
        self.algo = algo;
        if self.winograd() {
            let n = 16 * self.in_ch * self.out_ch;
            self.wino_u.resize(n, 0.0);
            self.wino_ub.resize(n, 0.0);
        }
        self.reserve(0);
    }

    /// The algorithm set by `set_algo`.
    pub fn algo(&self) -> ConvAlgo {
        self.algo
    }

    /// Whether this layer's products run on Winograd's transforms.
    fn winograd(&self) -> bool {
        self.algo == ConvAlgo::Winograd && self.geom().same3() && self.in_ch >= WINOGRAD_MIN_IN
    }

    /// The table of `shift3`'s rows, for the geometries that use it.
    fn with_shift_rows(mut self) -> Self {
        let g = self.geom();
        if g.same3() {
            self.shifted = shift3_rows(g.c, g.h, g.w);
            let hw = g.h * g.w;
            // Only with tiles of 4 rows (input channels) to hide the multiply-add latency:
            // with fewer, the lowered product (9 rows per channel) is faster.
            if g.c >= 4 && hw >= 8 && runs_small(g.ckk(), self.out_ch, hw, Trans::A) {
                // Tap t = (ki, kj) of dx reads dy shifted the other way: row (oc, 8 - t) of
                // the forward table, on dy's planes.
                let rows = shift3_rows(self.out_ch, g.h, g.w);
                self.tap_rows = (0..9 * self.out_ch)
                    .map(|i| rows[(i % self.out_ch) * 9 + 8 - i / self.out_ch])
                    .collect();
                self.tap_weights = vec![0.0; 9 * g.c * self.out_ch];
            }
        }
        self
    }

    /// At least `pieces` workspaces, each sized by `reserve`.
    fn workspaces(&mut self, pieces: usize) {
        if self.cols.len() < pieces {
            self.cols.resize_with(pieces, Vec::new);
        }
        self.reserve(0);
    }

    fn geom(&self) -> Geom {
        Geom {
            c: self.in_ch,
            h: self.in_h,
            w: self.in_w,
            k: self.k,
            s: self.stride,
            p: self.padding,
            oh: self.out_h,
            ow: self.out_w,
        }
    }
}

impl Layer for Conv2d {
    fn in_size(&self) -> usize {
        self.in_ch * self.in_h * self.in_w
    }
    fn out_size(&self) -> usize {
        self.out_ch * self.out_h * self.out_w
    }

    /// The workspace is one example large whatever the batch (`max_batch` sizes only the bias
    /// gradient's sums).
    fn reserve(&mut self, max_batch: usize) {
        if self.bias.is_some() && self.bias_sums.len() < max_batch * self.out_ch {
            self.bias_sums.resize(max_batch * self.out_ch, 0.0);
        }
        let g = self.geom();
        let patches = if g.pointwise() {
            0
        } else {
            g.ckk() * g.oh * g.ow
        };
        // Patches, then dy of one example transposed (see `backward_weights`); or dy's
        // shifted copies (`backward_input`).
        let shifted_dy = if self.tap_rows.is_empty() {
            0
        } else {
            self.out_ch * 3 * (g.h + 2) * g.w
        };
        let wino = if self.winograd() {
            let (c, o) = (g.c, self.out_ch);
            winograd::workspace_len(c, o, g.h, g.w)
                .max(winograd::workspace_len(o, c, g.h, g.w))
                .max(16 * c * o + winograd::grad_workspace_len(c, o, g.h, g.w))
        } else {
            0
        };
        let len = (patches + g.oh * g.ow * self.out_ch)
            .max(shifted_dy)
            .max(wino);
        for c in &mut self.cols {
            if c.len() < len {
                c.resize(len, 0.0);
            }
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        check_forward(self, x, y, n)?;
        let (g, isz, osz, out_ch) = (self.geom(), self.in_size(), self.out_size(), self.out_ch);
        let p = pieces(ctx.threads, n, 1);
        self.workspaces(p);
        if self.winograd() {
            // One example at a time on each thread (its arithmetic never depends on the
            // split).
            winograd::filter_transform(
                &self.weight,
                out_ch,
                g.c,
                false,
                &mut self.wino_u,
                ctx.threads,
            );
            let (u, bias) = (&self.wino_u[..], self.bias.as_deref());
            let ys = Disjoint::new(&mut y[..n * osz]);
            let ws = Disjoint::new(&mut self.cols[..p]);
            par_for(ctx.threads, p, |t| {
                let r = part(n, p, t);
                // SAFETY: piece t alone has examples r and workspace t.
                let (yr, cols) =
                    unsafe { (ys.range(r.start * osz..r.end * osz), ws.range(t..t + 1)) };
                for (i, yi) in r.zip(yr.chunks_exact_mut(osz)) {
                    let xi = &x[i * isz..][..isz];
                    winograd::conv3x3(xi, g.c, out_ch, g.h, g.w, u, bias, yi, &mut cols[0]);
                }
            });
            return Ok(());
        }
        let (w, bias) = (&self.weight[..], self.bias.as_deref());
        if p == 1 {
            // One piece (one thread, or one example): let the products split their rows.
            let cols = &mut self.cols[0];
            let shifted = &self.shifted;
            forward_half(
                g,
                out_ch,
                w,
                bias,
                &x[..n * isz],
                y,
                cols,
                shifted,
                ctx.threads,
            );
            return Ok(());
        }
        let ys = Disjoint::new(&mut y[..n * osz]);
        let ws = Disjoint::new(&mut self.cols[..p]);
        let shifted = &self.shifted;
        par_for(ctx.threads, p, |t| {
            let r = part(n, p, t);
            // SAFETY: piece t alone has examples r and workspace t.
            let (yr, cols) = unsafe { (ys.range(r.start * osz..r.end * osz), ws.range(t..t + 1)) };
            let xr = &x[r.start * isz..r.end * isz];
            forward_half(g, out_ch, w, bias, xr, yr, &mut cols[0], shifted, 1);
        });
        Ok(())
    }

    fn backward(
        &mut self,
        ctx: Ctx,
        x: &[f32],
        _y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        let (g, isz, osz, out_ch) = (self.geom(), self.in_size(), self.out_size(), self.out_ch);
        let ckk = g.ckk();
        // The weight gradient: two halves of the batch, each split by input channels into
        // `blocks` row blocks when there are threads for more than two pieces. The input
        // gradient: `p` blocks of examples. With more than one of those, both run as the
        // pieces of one region (the weight gradient's first, as they are the longest), so
        // that a thread done with its share takes the next piece of either instead of waiting
        // at the end of the first.
        let blocks = ctx.threads.div_ceil(2).min(g.c).max(1);
        let p = if dx.is_some() {
            pieces(ctx.threads, n, 1)
        } else {
            0
        };
        let wp = 2 * blocks;
        let one_input = p == 1;
        // The input gradient takes the pieces the weight gradient leaves of `p` (at least one
        // per thread), so that the region needs no more workspaces than the larger of the two
        // did when they ran as separate regions.
        let input_pieces = if p <= 1 {
            0
        } else {
            p.saturating_sub(wp).max(ctx.threads.min(n))
        };
        self.workspaces(wp + input_pieces);
        // The input gradient by taps needs the weights tap-major (not when Winograd's
        // transform takes it).
        if !(self.tap_weights.is_empty() || self.winograd() && dx.is_some()) {
            // tap_weights[t][c][oc] = weight[oc][c][t].
            let (c, kk) = (g.c, 9);
            for (t, plane) in self.tap_weights.chunks_exact_mut(c * out_ch).enumerate() {
                for (ch, row) in plane.chunks_exact_mut(out_ch).enumerate() {
                    for (oc, v) in row.iter_mut().enumerate() {
                        *v = self.weight[oc * c * kk + ch * kk + t];
                    }
                }
            }
        }
        let taps = Taps {
            rows: &self.tap_rows,
            weights: &self.tap_weights,
        };
        let wino_w = self.winograd();
        let wino = if self.winograd() && dx.is_some() {
            winograd::filter_transform(
                &self.weight,
                out_ch,
                g.c,
                true,
                &mut self.wino_ub,
                ctx.threads,
            );
            Some(&self.wino_ub[..])
        } else {
            None
        };
        let w = &self.weight[..];
        let h = n / 2;
        let halves = [0..h, h..n];
        let mut dx = dx;
        {
            let [gwa, gwb] = &mut self.grad_wt;
            let gws = [Disjoint::new(&mut gwa[..]), Disjoint::new(&mut gwb[..])];
            let ws = Disjoint::new(&mut self.cols[..wp + input_pieces]);
            let dxs = match (&mut dx, one_input) {
                (Some(d), false) => Some(Disjoint::new(&mut d[..n * isz])),
                _ => None,
            };
            let shifted = &self.shifted;
            let kk = g.k * g.k;
            par_for(ctx.threads, wp + input_pieces, |t| {
                if t >= wp {
                    let j = t - wp;
                    let r = part(n, input_pieces, j);
                    let dxs = dxs.as_ref().expect("input pieces come with dx");
                    // SAFETY: piece t alone has examples r of dx and workspace t.
                    let (dxr, cols) =
                        unsafe { (dxs.range(r.start * isz..r.end * isz), ws.range(t..t + 1)) };
                    let dyr = &dy[r.start * osz..r.end * osz];
                    backward_input(g, out_ch, w, taps, wino, dyr, dxr, &mut cols[0], 1);
                    return;
                }
                let (half, b) = (t / blocks, t % blocks);
                let chans = part(g.c, blocks, b);
                let e = &halves[half];
                let rows = chans.start * kk * out_ch..chans.end * kk * out_ch;
                // SAFETY: piece t alone has workspace t and these rows of its half's gradient.
                let (cols, dwt) = unsafe { (ws.range(t..t + 1), gws[half].range(rows)) };
                let (xe, dye) = (
                    &x[e.start * isz..e.end * isz],
                    &dy[e.start * osz..e.end * osz],
                );
                backward_weights(
                    g,
                    out_ch,
                    xe,
                    dye,
                    chans,
                    &mut cols[0],
                    dwt,
                    shifted,
                    wino_w,
                );
            });
        }
        if let (Some(dx), true) = (dx, one_input) {
            // One example (or one thread): the product splits its rows instead.
            let cols = &mut self.cols[0];
            backward_input(
                g,
                out_ch,
                w,
                taps,
                wino,
                &dy[..n * osz],
                dx,
                cols,
                ctx.threads,
            );
        }
        let [gwa, gwb] = &self.grad_wt;
        add_transposed(gwa, gwb, ckk, out_ch, &mut self.grad_weight);
        if self.grad_bias.is_some() && self.bias_sums.len() < n * out_ch {
            self.bias_sums.resize(n * out_ch, 0.0);
        }
        if let Some(gb) = &mut self.grad_bias {
            let ohw = g.oh * g.ow;
            // f64: a channel sums n*oh*ow values (25,088 for a batch of 32 at 28x28). Each
            // example's map summed in order, then the maps' sums in order of the examples; the
            // threads take blocks of examples for the first, and the channels' totals follow.
            let ss = Disjoint::new(&mut self.bias_sums[..]);
            par_ranges(ctx.threads, n, (1usize << 14).div_ceil(osz), |r| {
                // SAFETY: the example blocks are disjoint.
                let s = unsafe { ss.range(r.start * out_ch..r.end * out_ch) };
                ordered_sums_f64(&dy[r.start * osz..r.end * osz], ohw, s);
            });
            for (o, gbo) in gb.iter_mut().enumerate() {
                let s = (0..n).fold(-0.0f64, |a, i| a + self.bias_sums[i * out_ch + o]);
                *gbo = s as f32;
            }
        }
    }

    fn zero_grad(&mut self) {
        self.grad_weight.fill(0.0);
        if let Some(gb) = &mut self.grad_bias {
            gb.fill(0.0);
        }
    }

    fn for_each_param(&mut self, f: &mut dyn FnMut(&mut [f32], &[f32])) {
        f(&mut self.weight, &self.grad_weight);
        if let (Some(b), Some(gb)) = (&mut self.bias, &self.grad_bias) {
            f(b, gb);
        }
    }

    fn visit_state(&mut self, prefix: &str, f: &mut dyn FnMut(&str, &[usize], TensorMut<'_>)) {
        f(
            &format!("{prefix}weight"),
            &[self.out_ch, self.in_ch, self.k, self.k],
            TensorMut::F32(&mut self.weight),
        );
        if let Some(b) = &mut self.bias {
            f(&format!("{prefix}bias"), &[self.out_ch], TensorMut::F32(b));
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        let k = self.k;
        let mut s = format!(
            "Conv2d({}, {}, kernel_size=({k}, {k}), stride=({s}, {s})",
            self.in_ch,
            self.out_ch,
            s = self.stride
        );
        if self.padding > 0 {
            s += &format!(", padding=({p}, {p})", p = self.padding);
        }
        if self.bias.is_none() {
            s += ", bias=False";
        }
        s + &format!(") on {}x{}", self.in_h, self.in_w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The register-block transpose (taken at this machine's SIMD level) gives the element-wise
    /// transpose, for shapes with and without whole 16 x 16 blocks.
    #[test]
    fn transpose_matches_the_element_wise_copy() {
        for (rows, cols) in [
            (16, 16),
            (16, 784),
            (32, 196),
            (64, 49),
            (17, 33),
            (5, 40),
            (48, 7),
            (1, 1),
            (3, 1),
            (1, 20),
            (24, 196),
            (196, 24),
            (49, 64),
            (31, 47),
        ] {
            let a = values(rows * cols, (rows * 1000 + cols) as u32);
            let (mut fast, mut slow) = (vec![0f32; rows * cols], vec![1f32; rows * cols]);
            transpose(&a, rows, cols, &mut fast);
            for r in 0..rows {
                for c in 0..cols {
                    slow[c * rows + r] = a[r * cols + c];
                }
            }
            assert_eq!(fast, slow, "{rows} x {cols}");
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// The 3x3 same-size products from `shift3`'s windows give the bits of the lowered matrix
    /// (`im2col_same3`): forward (with and without bias, accumulating onto it) and the weight
    /// gradient of a channel block, on maps from 2x2 to 28x28.
    /// The input gradient by taps (`tap_sums` on dy's shifted copies) against the lowered
    /// gradient and `col2im`, bit for bit, with values spanning magnitudes (so that a change
    /// of the order of the additions shows), on maps from 2x4 to 28x28, channel counts that do
    /// and do not fill the 4-row tiles, and widths that leave column tails.
    #[test]
    fn tap_sums_give_the_bits_of_col2im() {
        let shapes: &[(usize, usize, usize, usize)] = if cfg!(miri) {
            // Miri (the CI's check of the unsafe tiles): the small shapes, which still have
            // 4-row and smaller tiles and column tails.
            &[(4, 2, 4, 3), (5, 5, 7, 4), (7, 3, 11, 5)]
        } else {
            &[
                (4, 2, 4, 3),
                (5, 5, 7, 4),
                (16, 7, 7, 8),
                (6, 28, 28, 16),
                (24, 14, 14, 32),
                (7, 3, 11, 5),
            ]
        };
        for &(c, h, w, out_ch) in shapes {
            let g = Geom {
                c,
                h,
                w,
                k: 3,
                s: 1,
                p: 1,
                oh: h,
                ow: w,
            };
            let (hw, ckk) = (h * w, g.ckk());
            let n = 2;
            let spread = |v: Vec<f32>| -> Vec<f32> {
                v.into_iter()
                    .enumerate()
                    .map(|(i, x)| if i % 7 == 0 { x * 1e4 } else { x })
                    .collect()
            };
            let weight = spread(values(out_ch * ckk, 5));
            let dy = spread(values(n * out_ch * hw, 6));
            let mut conv = Conv2d::new(c, out_ch, 3, 1, 1, false, h, w).unwrap();
            conv.weight.copy_from_slice(&weight);
            assert!(
                !conv.tap_rows.is_empty(),
                "{c}x{h}x{w}: the tap path applies"
            );
            for (i, v) in conv.tap_weights.iter_mut().enumerate() {
                let (t, ch, oc) = (i / (c * out_ch), i / out_ch % c, i % out_ch);
                *v = weight[oc * c * 9 + ch * 9 + t];
            }
            let taps = Taps {
                rows: &conv.tap_rows,
                weights: &conv.tap_weights,
            };
            let none = Taps {
                rows: &[],
                weights: &[],
            };
            let ws_len = (ckk * hw + hw * out_ch).max(out_ch * 3 * (h + 2) * w);
            let mut dx = [vec![1f32; n * c * hw], vec![2f32; n * c * hw]];
            for (d, t) in dx.iter_mut().zip([none, taps]) {
                let mut ws = vec![0f32; ws_len];
                backward_input(g, out_ch, &weight, t, None, &dy, d, &mut ws, 1);
            }
            let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&dx[0]), bits(&dx[1]), "{c}x{h}x{w} -> {out_ch}");
        }
    }

    #[test]
    fn shifted_windows_give_the_lowered_bits() {
        for (c, h, w, out_ch) in [
            (1, 2, 2, 3),
            (2, 5, 7, 4),
            (16, 7, 7, 8),
            (3, 28, 28, 16),
            (24, 14, 14, 32),
        ] {
            let g = Geom {
                c,
                h,
                w,
                k: 3,
                s: 1,
                p: 1,
                oh: h,
                ow: w,
            };
            assert!(g.same3());
            let (hw, ckk) = (h * w, g.ckk());
            let n = 3;
            let x = values(n * c * hw, 1);
            let weight = values(out_ch * ckk, 2);
            let bias = values(out_ch, 3);
            let table = shift3_rows(c, h, w);
            let ws_len = ckk * hw + hw * out_ch;
            for b in [None, Some(&bias[..])] {
                let mut y = [vec![0f32; n * out_ch * hw], vec![0f32; n * out_ch * hw]];
                for (yv, t) in y.iter_mut().zip([&[][..], &table[..]]) {
                    let mut ws = vec![0f32; ws_len];
                    forward_half(g, out_ch, &weight, b, &x, yv, &mut ws, t, 1);
                }
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&y[0]),
                    bits(&y[1]),
                    "forward {c}x{h}x{w} -> {out_ch}, bias {}",
                    b.is_some()
                );
            }
            let dy = values(n * out_ch * hw, 4);
            let chans = c / 3..c;
            let rows = chans.len() * 9;
            let mut dwt = [vec![0f32; rows * out_ch], vec![0f32; rows * out_ch]];
            for (d, t) in dwt.iter_mut().zip([&[][..], &table[..]]) {
                let mut ws = vec![0f32; ws_len];
                backward_weights(g, out_ch, &x, &dy, chans.clone(), &mut ws, d, t, false);
            }
            assert!(
                dwt[0]
                    .iter()
                    .zip(&dwt[1])
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "weight gradient {c}x{h}x{w}"
            );
            assert!(dwt[0].iter().any(|&v| v != 0.0));
        }
    }
}
