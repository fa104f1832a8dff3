//! Pooling on NCHW feature maps: `MaxPool2d` and `AvgPool2d` (PyTorch's `nn.MaxPool2d`,
//! `nn.AvgPool2d` with either `count_include_pad`, no ceil mode), and `GlobalAvgPool` (the mean
//! over all positions of each channel, `x.mean((2, 3))`, giving `n x C`). Pools act on each
//! channel alone and behave the same in every mode.

use super::conv::{checked_product, out_len, shape_error, valid_range};
use super::{backward_nothing, check_forward, par_batch, span, Ctx, Layer};
use crate::kernels::{ordered_sums_f64, par_ranges, Disjoint};
use crate::{Error, Result};

/// Window geometry shared by the two windowed pools.
#[derive(Clone, Copy, Debug)]
struct Window {
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    p: usize,
    oh: usize,
    ow: usize,
}

impl Window {
    /// The geometry of pool `name`, or an error saying what is wrong with it.
    fn new(name: &str, c: usize, k: usize, s: usize, p: usize, h: usize, w: usize) -> Result<Self> {
        let what = format!("{name}(kernel_size={k}, stride={s}, padding={p}) on {c}x{h}x{w}");
        let err = |context: &str, e: Error| shape_error(&what, context, e);
        if c == 0 {
            return Err(err("", Error::Shape("0 channels".into())));
        }
        if k == 0 || s == 0 {
            return Err(err(
                "",
                Error::Shape("kernel and stride must be at least 1".into()),
            ));
        }
        // PyTorch's rule: a window may not lie entirely in the padding.
        if p > k / 2 {
            return Err(err(
                "",
                Error::Shape(format!("pool padding {p} above half the kernel {k}")),
            ));
        }
        let oh = out_len(h, k, s, p).map_err(|e| err("height: ", e))?;
        let ow = out_len(w, k, s, p).map_err(|e| err("width: ", e))?;
        checked_product(&[c, h, w], "input").map_err(|e| err("", e))?;
        Ok(Window {
            c,
            h,
            w,
            k,
            s,
            p,
            oh,
            ow,
        })
    }
    fn in_size(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_size(&self) -> usize {
        self.c * self.oh * self.ow
    }
    /// The input rows (or columns) under window `o` along an axis of length `len`: the kernel
    /// taps clipped to the input.
    fn span(&self, o: usize, len: usize) -> (usize, usize) {
        let start = o * self.s;
        let lo = start.saturating_sub(self.p);
        let hi = (start + self.k - self.p).min(len);
        (lo, hi)
    }
    /// The 3x3, stride 1, padding 1 window, which keeps the map size: a separable box filter.
    fn is_box3(&self) -> bool {
        self.k == 3 && self.s == 1 && self.p == 1 && self.h >= 2 && self.h * self.w <= BOX_MAX_HW
    }
    fn describe(&self, name: &str, extra: &str) -> String {
        format!(
            "{name}(kernel_size={}, stride={}, padding={}{extra}) on {}x{}x{}",
            self.k, self.s, self.p, self.c, self.h, self.w
        )
    }
}

/// Max pooling of whole planes (`x` holds `planes * h * w`), with the winners' indices.
fn max_forward(g: Window, x: &[f32], y: &mut [f32], argmax: &mut [u32]) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let planes = y.len() / ohw.max(1);
    let ys = y.chunks_exact_mut(ohw);
    let args = argmax.chunks_exact_mut(ohw);
    let fast = g.k == 2 && g.s == 2 && g.p == 0;
    for ((xp, yp), ap) in x[..planes * hw].chunks_exact(hw).zip(ys).zip(args) {
        if fast {
            max_2x2(g, xp, yp, ap);
            continue;
        }
        for oy in 0..g.oh {
            let (y0, y1) = g.span(oy, g.h);
            for ox in 0..g.ow {
                let (x0, x1) = g.span(ox, g.w);
                let mut best = f32::NEG_INFINITY;
                let mut arg = y0 * g.w + x0;
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let v = xp[iy * g.w + ix];
                        // Strictly greater: the first maximum wins ties, as in PyTorch,
                        // which also lets a NaN through.
                        if v > best || v.is_nan() {
                            best = v;
                            arg = iy * g.w + ix;
                        }
                    }
                }
                yp[oy * g.ow + ox] = best;
                ap[oy * g.ow + ox] = arg as u32;
            }
        }
    }
}

/// The 2x2, stride 2 window of one plane, taps in PyTorch's order (row by row), with the same
/// rule as the general loop: a later tap wins if strictly greater, or NaN. On AVX-512, 16
/// windows at a time (the taps split into even and odd columns by permutes); elsewhere
/// branch-free selects. The same values and indices either way.
fn max_2x2(g: Window, xp: &[f32], yp: &mut [f32], ap: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512 {
        assert!(
            xp.len() >= g.h * g.w && 2 * g.oh <= g.h && 2 * g.ow <= g.w,
            "max_2x2: the plane holds every window"
        );
        assert!(yp.len() >= g.oh * g.ow && ap.len() >= g.oh * g.ow);
        // SAFETY: the level says the CPU has AVX-512F; the checks above bound every access.
        unsafe { max_2x2_avx512(g, xp, yp, ap) };
        return;
    }
    max_2x2_portable(g, xp, yp, ap)
}

/// `max_2x2` on AVX-512.
///
/// # Safety
/// The CPU has AVX-512F; `xp` holds the `h x w` plane with `2 oh <= h` and `2 ow <= w`; `yp`
/// and `ap` hold `oh x ow` values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_2x2_avx512(g: Window, xp: &[f32], yp: &mut [f32], ap: &mut [u32]) {
    use std::arch::x86_64::*;
    let w = g.w;
    use crate::kernels::simd::lanes;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    let iota2 = _mm512_slli_epi32::<1>(_mm512_setr_epi32(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    ));
    let offs = [1u32, w as u32, w as u32 + 1].map(|o| _mm512_set1_epi32(o as i32));
    for oy in 0..g.oh {
        let (r0, r1) = (
            xp.as_ptr().add(2 * oy * w),
            xp.as_ptr().add((2 * oy + 1) * w),
        );
        let (yr, ar) = (
            yp.as_mut_ptr().add(oy * g.ow),
            ap.as_mut_ptr().add(oy * g.ow),
        );
        let base = (2 * oy * w) as u32;
        let mut ox = 0;
        while ox < g.ow {
            let cnt = (g.ow - ox).min(16);
            // The 2 * cnt inputs of each row: the first 16, then the rest.
            let (m0, m1) = (lanes(2 * cnt), lanes((2 * cnt).saturating_sub(16)));
            let pair = |r: *const f32| {
                let a = _mm512_maskz_loadu_ps(m0, r.add(2 * ox));
                let b = _mm512_maskz_loadu_ps(m1, r.add(2 * ox + 16));
                (
                    _mm512_permutex2var_ps(a, even, b),
                    _mm512_permutex2var_ps(a, odd, b),
                )
            };
            let ((p00, p01), (p10, p11)) = (pair(r0), pair(r1));
            let mut best = p00;
            let mut off = _mm512_setzero_si512();
            for (v, o) in [(p01, offs[0]), (p10, offs[1]), (p11, offs[2])] {
                let take = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best)
                    | _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                best = _mm512_mask_blend_ps(take, best, v);
                off = _mm512_mask_blend_epi32(take, off, o);
            }
            let m = lanes(cnt);
            _mm512_mask_storeu_ps(yr.add(ox), m, best);
            let idx = _mm512_add_epi32(
                _mm512_set1_epi32((base + 2 * ox as u32) as i32),
                _mm512_add_epi32(iota2, off),
            );
            _mm512_mask_storeu_epi32(ar.add(ox).cast(), m, idx);
            ox += 16;
        }
    }
}

crate::simd_kernel! {
    /// `max_2x2` on the AVX2 and baseline levels.
    fn max_2x2_portable(g: Window, xp: &[f32], yp: &mut [f32], ap: &mut [u32]) {
        let w = g.w;
        for oy in 0..g.oh {
            let r0 = &xp[2 * oy * w..][..2 * g.ow];
            let r1 = &xp[(2 * oy + 1) * w..][..2 * g.ow];
            let yr = &mut yp[oy * g.ow..][..g.ow];
            let ar = &mut ap[oy * g.ow..][..g.ow];
            let base = (2 * oy * w) as u32;
            for (ox, ((yv, av), (p0, p1))) in yr
                .iter_mut()
                .zip(ar.iter_mut())
                .zip(r0.chunks_exact(2).zip(r1.chunks_exact(2)))
                .enumerate()
            {
                let mut best = p0[0];
                let mut off = 0u32;
                for (v, o) in [(p0[1], 1u32), (p1[0], w as u32), (p1[1], w as u32 + 1)] {
                    let take = v > best || v.is_nan();
                    best = if take { v } else { best };
                    off = if take { o } else { off };
                }
                *yv = best;
                *av = base + 2 * ox as u32 + off;
            }
        }
    }
}

/// Scatter each output gradient onto the input that won its window.
fn max_backward(g: Window, dy: &[f32], argmax: &[u32], dx: &mut [f32]) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let planes = dx.len() / hw.max(1);
    #[cfg(target_arch = "x86_64")]
    if g.k == 2
        && g.s == 2
        && g.p == 0
        && crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512
    {
        assert!(dy.len() >= planes * ohw && argmax.len() >= planes * ohw);
        assert!(2 * g.oh <= g.h && 2 * g.ow <= g.w);
        for ((dxp, dyp), ap) in dx
            .chunks_exact_mut(hw)
            .zip(dy.chunks_exact(ohw))
            .zip(argmax.chunks_exact(ohw))
        {
            // SAFETY: the level says the CPU has AVX-512F; the checks above bound every
            // access.
            unsafe { max_2x2_backward_avx512(g, dyp, ap, dxp) };
        }
        return;
    }
    max_scatter(g, dy, argmax, dx)
}

/// `max_backward` on any CPU and window: fill with zeros, then add each output gradient to
/// its winner.
fn max_scatter(g: Window, dy: &[f32], argmax: &[u32], dx: &mut [f32]) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let planes = dx.len() / hw.max(1);
    let dxs = dx.chunks_exact_mut(hw);
    let args = argmax[..planes * ohw].chunks_exact(ohw);
    for ((dxp, dyp), ap) in dxs.zip(dy[..planes * ohw].chunks_exact(ohw)).zip(args) {
        dxp.fill(0.0);
        // Overlapping windows (stride < k) may pick the same input twice: add.
        for (&d, &a) in dyp.iter().zip(ap) {
            dxp[a as usize] += d;
        }
    }
}

/// `max_backward` of one plane for the 2x2, stride 2 windows on AVX-512: each input gets
/// `0 + dy` of its window if it won it, else 0 (the values the fill and scatter give, `-0`
/// becoming `+0` alike), written row by row instead of filled then scattered.
///
/// # Safety
/// The CPU has AVX-512F; `dyp` and `ap` hold `oh x ow` values, `dxp` the `h x w` plane, with
/// `2 oh <= h` and `2 ow <= w`. (An index in `ap` outside its window, which `max_2x2` never
/// writes, would be ignored, not followed.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_2x2_backward_avx512(g: Window, dyp: &[f32], ap: &[u32], dxp: &mut [f32]) {
    use std::arch::x86_64::*;
    let w = g.w;
    use crate::kernels::simd::lanes;
    // Interleave two vectors of 16: lanes 0..16 of the pair's first 32, then 16..32.
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let iota2 = _mm512_slli_epi32::<1>(_mm512_setr_epi32(
        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
    ));
    let (one, wv) = (_mm512_set1_epi32(1), _mm512_set1_epi32(w as i32));
    for oy in 0..g.oh {
        let (dr, ar) = (dyp.as_ptr().add(oy * g.ow), ap.as_ptr().add(oy * g.ow));
        let rows = [
            dxp.as_mut_ptr().add(2 * oy * w),
            dxp.as_mut_ptr().add((2 * oy + 1) * w),
        ];
        let mut ox = 0;
        while ox < g.ow {
            let cnt = (g.ow - ox).min(16);
            let m = lanes(cnt);
            let v = _mm512_add_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(m, dr.add(ox)));
            let a = _mm512_maskz_loadu_epi32(m, ar.add(ox).cast());
            // The window's top-left input of each of the 16 outputs.
            let p00 = _mm512_add_epi32(_mm512_set1_epi32((2 * oy * w + 2 * ox) as i32), iota2);
            let p10 = _mm512_add_epi32(p00, wv);
            for (row, p0) in rows.iter().zip([p00, p10]) {
                let left = _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(a, p0), v);
                let right =
                    _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(a, _mm512_add_epi32(p0, one)), v);
                let (m0, m1) = (lanes(2 * cnt), lanes((2 * cnt).saturating_sub(16)));
                let dst = row.add(2 * ox);
                _mm512_mask_storeu_ps(dst, m0, _mm512_permutex2var_ps(left, lo, right));
                _mm512_mask_storeu_ps(dst.add(16), m1, _mm512_permutex2var_ps(left, hi, right));
            }
            ox += 16;
        }
        // An odd width's last column is in no window.
        for r in rows {
            for x in 2 * g.ow..w {
                *r.add(x) = 0.0;
            }
        }
    }
    // An odd height's last row is in no window.
    dxp[2 * g.oh * w..g.h * w].fill(0.0);
}

/// Largest map (`h * w`) the 3x3 box filter handles with its buffers on the stack.
const BOX_MAX_HW: usize = 1024;

/// Average pooling of whole planes, divided by `k * k` (padding counted as zeros) or, with
/// `include_pad` false, by the number of taps inside the input. Also the backward pass of the
/// 3x3, stride 1, padding 1 pool counting the padding, whose adjoint is the same filter.
fn avg_forward(g: Window, include_pad: bool, x: &[f32], y: &mut [f32]) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let planes = y.len() / ohw.max(1);
    // Divided (not multiplied by the reciprocal), as PyTorch does.
    let div = (g.k * g.k) as f32;
    if include_pad && g.is_box3() {
        box3(g.h, g.w, &x[..planes * hw], y, div);
        return;
    }
    let ys = y.chunks_exact_mut(ohw);
    for (xp, yp) in x[..planes * hw].chunks_exact(hw).zip(ys) {
        for oy in 0..g.oh {
            let (y0, y1) = g.span(oy, g.h);
            for ox in 0..g.ow {
                let (x0, x1) = g.span(ox, g.w);
                let mut s = 0f32;
                for iy in y0..y1 {
                    for &v in &xp[iy * g.w + x0..iy * g.w + x1] {
                        s += v;
                    }
                }
                let div = if include_pad {
                    div
                } else {
                    ((y1 - y0) * (x1 - x0)) as f32
                };
                yp[oy * g.ow + ox] = s / div;
            }
        }
    }
}

crate::simd_kernel! {
    /// The 3x3 box sum of each `h x w` plane of `xp` with zero padding, divided by `div`. The
    /// planes are small (7x7 in the presets), so rather than row by row (where loop overhead
    /// dominates) each plane is one flat run: the rows above and below are added as shifted
    /// runs, then the left and right neighbours, masked off at the row ends. Every output is
    /// `((up + mid + down) of the left column + ... )` in a fixed order.
    fn box3(h: usize, w: usize, xp: &[f32], yp: &mut [f32], div: f32) {
        let hw = h * w;
        // Column sums with one zero of padding at each end of the plane: vs[1 + i] for pixel i.
        let mut vs = [0f32; BOX_MAX_HW + 2];
        // All ones where the pixel has a left (right) neighbour in its row, else zero.
        let mut left = [0u32; BOX_MAX_HW];
        let mut right = [0u32; BOX_MAX_HW];
        for i in 0..hw {
            left[i] = if i % w != 0 { u32::MAX } else { 0 };
            right[i] = if i % w != w - 1 { u32::MAX } else { 0 };
        }
        let (left, right) = (&left[..hw], &right[..hw]);
        for (xq, yq) in xp.chunks_exact(hw).zip(yp.chunks_exact_mut(hw)) {
            let col = &mut vs[1..hw + 1];
            col.copy_from_slice(xq);
            for (c, &a) in col[w..].iter_mut().zip(&xq[..hw - w]) {
                *c += a;
            }
            for (c, &a) in col[..hw - w].iter_mut().zip(&xq[w..]) {
                *c += a;
            }
            let (l, m, r) = (&vs[..hw], &vs[1..hw + 1], &vs[2..hw + 2]);
            for (i, o) in yq.iter_mut().enumerate() {
                let lv = f32::from_bits(l[i].to_bits() & left[i]);
                let rv = f32::from_bits(r[i].to_bits() & right[i]);
                *o = (lv + m[i] + rv) / div;
            }
        }
    }
}

/// Add each output gradient, divided as in the forward pass, to the inputs its window covered.
fn avg_backward(g: Window, include_pad: bool, dy: &[f32], dx: &mut [f32]) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let planes = dx.len() / hw.max(1);
    let div = (g.k * g.k) as f32;
    if include_pad && g.is_box3() {
        // The box filter is its own adjoint.
        box3(g.h, g.w, &dy[..planes * ohw], dx, div);
        return;
    }
    let pairs = dx
        .chunks_exact_mut(hw)
        .zip(dy[..planes * ohw].chunks_exact(ohw));
    if !include_pad {
        // Window by window: each output's share, its gradient over its own count, added to
        // the input pixels the window covered.
        for (dxp, dyp) in pairs {
            dxp.fill(0.0);
            for oy in 0..g.oh {
                let (y0, y1) = g.span(oy, g.h);
                for ox in 0..g.ow {
                    let (x0, x1) = g.span(ox, g.w);
                    let share = dyp[oy * g.ow + ox] / ((y1 - y0) * (x1 - x0)) as f32;
                    for iy in y0..y1 {
                        for d in &mut dxp[iy * g.w + x0..iy * g.w + x1] {
                            *d += share;
                        }
                    }
                }
            }
        }
        return;
    }
    for (dxp, dyp) in pairs {
        dxp.fill(0.0);
        // Tap by tap (as im2col's adjoint): for each kernel offset, the outputs whose tap
        // lands inside the input add their share to a contiguous run of input pixels
        // (for stride 1).
        for ki in 0..g.k {
            let (oy0, oy1) = valid_range(ki, g.s, g.p, g.h, g.oh);
            for kj in 0..g.k {
                let (ox0, ox1) = valid_range(kj, g.s, g.p, g.w, g.ow);
                if ox0 == ox1 {
                    continue;
                }
                let ix0 = ox0 * g.s + kj - g.p;
                for oy in oy0..oy1 {
                    let iy = oy * g.s + ki - g.p;
                    let dr = &mut dxp[iy * g.w..][..g.w];
                    let src = &dyp[oy * g.ow + ox0..oy * g.ow + ox1];
                    for (d, &v) in dr[ix0..].iter_mut().step_by(g.s).zip(src) {
                        *d += v / div;
                    }
                }
            }
        }
    }
}

/// Max pooling; remembers where each maximum came from for the backward pass.
///
/// Works without `reserve` (the winners' indices are sized by the first forward pass of a
/// larger batch). `backward` before any forward pass, or with another batch size than the last
/// forward's, fills `dx` with zeros.
pub struct MaxPool2d {
    win: Window,
    /// For each output of the last forward pass, the index (`y * w + x`) within its channel of
    /// the input that won.
    argmax: Vec<u32>,
    /// The batch size of the last successful forward pass (0: none).
    last_n: usize,
}

impl MaxPool2d {
    /// `(kernel, stride, padding, channels)`, for export.
    pub fn geometry(&self) -> (usize, usize, usize, usize) {
        (self.win.k, self.win.s, self.win.p, self.win.c)
    }
    /// `channels` maps of `in_h x in_w`; a `k x k` window every `stride`, `padding` of -inf.
    ///
    /// An error (`Error::Shape`, saying what is wrong) for zero channels, kernel, stride or
    /// input size, padding above half the kernel (PyTorch's rule), a kernel larger than the
    /// padded input, or a map of more than 2^32 positions.
    pub fn new(
        channels: usize,
        k: usize,
        stride: usize,
        padding: usize,
        in_h: usize,
        in_w: usize,
    ) -> Result<Self> {
        let win = Window::new("MaxPool2d", channels, k, stride, padding, in_h, in_w)?;
        if in_h
            .checked_mul(in_w)
            .is_none_or(|hw| hw > u32::MAX as usize)
        {
            return Err(Error::Shape(format!(
                "MaxPool2d on {in_h}x{in_w}: feature map too large (above 2^32 positions)"
            )));
        }
        Ok(MaxPool2d {
            win,
            argmax: Vec::new(),
            last_n: 0,
        })
    }
    /// The output map's `(height, width)`.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.win.oh, self.win.ow)
    }
}

impl Layer for MaxPool2d {
    fn in_size(&self) -> usize {
        self.win.in_size()
    }
    fn out_size(&self) -> usize {
        self.win.out_size()
    }
    fn reserve(&mut self, max_batch: usize) {
        let len = max_batch * self.out_size();
        if self.argmax.len() < len {
            self.argmax.resize(len, 0);
        }
    }

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        self.last_n = 0;
        check_forward(self, x, y, n)?;
        self.reserve(n);
        let g = self.win;
        let (isz, osz) = (g.in_size(), g.out_size());
        let ys = Disjoint::new(&mut y[..n * osz]);
        let am = Disjoint::new(&mut self.argmax[..n * osz]);
        par_batch(ctx.threads, n, |r| {
            let (i, o) = (span(&r, isz), span(&r, osz));
            // SAFETY: the example ranges are disjoint.
            max_forward(g, &x[i], unsafe { ys.range(o.clone()) }, unsafe {
                am.range(o)
            })
        });
        self.last_n = n;
        Ok(())
    }

    fn backward(
        &mut self,
        ctx: Ctx,
        _x: &[f32],
        _y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        if n != self.last_n {
            return backward_nothing(self, dx, n);
        }
        let Some(dx) = dx else { return };
        let g = self.win;
        let (isz, osz) = (g.in_size(), g.out_size());
        let dxs = Disjoint::new(&mut dx[..n * isz]);
        let am = &self.argmax;
        par_batch(ctx.threads, n, |r| {
            let (i, o) = (span(&r, isz), span(&r, osz));
            // SAFETY: the example ranges are disjoint.
            max_backward(g, &dy[o.clone()], &am[o], unsafe { dxs.range(i) })
        });
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        self.win.describe("MaxPool2d", "")
    }
}

/// Average pooling. With `count_include_pad` (PyTorch's default) every window is divided by
/// `k * k`, padding counted as zeros; without it, by the number of its taps inside the input.
pub struct AvgPool2d {
    win: Window,
    count_include_pad: bool,
}

impl AvgPool2d {
    /// `(kernel, stride, padding, channels)`, for export.
    pub fn geometry(&self) -> (usize, usize, usize, usize) {
        (self.win.k, self.win.s, self.win.p, self.win.c)
    }
    /// `channels` maps of `in_h x in_w`; a `k x k` window every `stride`, `padding` of zeros,
    /// counted in the divisor or not as PyTorch's `count_include_pad`.
    ///
    /// An error (`Error::Shape`, saying what is wrong) for zero channels, kernel, stride or
    /// input size, padding above half the kernel (PyTorch's rule) or a kernel larger than the
    /// padded input.
    pub fn new(
        channels: usize,
        k: usize,
        stride: usize,
        padding: usize,
        in_h: usize,
        in_w: usize,
        count_include_pad: bool,
    ) -> Result<Self> {
        Ok(AvgPool2d {
            win: Window::new("AvgPool2d", channels, k, stride, padding, in_h, in_w)?,
            count_include_pad,
        })
    }
    /// The output map's `(height, width)`.
    pub fn out_hw(&self) -> (usize, usize) {
        (self.win.oh, self.win.ow)
    }
    /// PyTorch's `count_include_pad`: whether the padding counts in each window's divisor.
    pub fn count_include_pad(&self) -> bool {
        self.count_include_pad
    }
}

impl Layer for AvgPool2d {
    fn in_size(&self) -> usize {
        self.win.in_size()
    }
    fn out_size(&self) -> usize {
        self.win.out_size()
    }
    fn reserve(&mut self, _max_batch: usize) {}

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        check_forward(self, x, y, n)?;
        let g = self.win;
        let (isz, osz) = (g.in_size(), g.out_size());
        let ys = Disjoint::new(&mut y[..n * osz]);
        let inc = self.count_include_pad;
        par_batch(ctx.threads, n, |r| {
            let (i, o) = (span(&r, isz), span(&r, osz));
            // SAFETY: the example ranges are disjoint.
            avg_forward(g, inc, &x[i], unsafe { ys.range(o) })
        });
        Ok(())
    }

    fn backward(
        &mut self,
        ctx: Ctx,
        _x: &[f32],
        _y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        let Some(dx) = dx else { return };
        let g = self.win;
        let (isz, osz) = (g.in_size(), g.out_size());
        let dxs = Disjoint::new(&mut dx[..n * isz]);
        let inc = self.count_include_pad;
        par_batch(ctx.threads, n, |r| {
            let (i, o) = (span(&r, isz), span(&r, osz));
            // SAFETY: the example ranges are disjoint.
            avg_backward(g, inc, &dy[o], unsafe { dxs.range(i) })
        });
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        let extra = if self.count_include_pad {
            ""
        } else {
            ", count_include_pad=False"
        };
        self.win.describe("AvgPool2d", extra)
    }
}

/// The mean of each channel over all its positions: `n x (C*H*W)` in, `n x C` out.
pub struct GlobalAvgPool {
    /// Channels.
    pub c: usize,
    /// Height of the maps.
    pub h: usize,
    /// Width of the maps.
    pub w: usize,
}

impl GlobalAvgPool {
    /// `channels` maps of `h x w`; an error (`Error::Shape`) if any of them is 0 (nothing to
    /// average) or their product overflows.
    pub fn new(channels: usize, h: usize, w: usize) -> Result<Self> {
        let what = format!("GlobalAvgPool on {channels}x{h}x{w}");
        if channels == 0 || h == 0 || w == 0 {
            return Err(Error::Shape(format!("{what}: a map of size 0")));
        }
        checked_product(&[channels, h, w], "input").map_err(|e| shape_error(&what, "", e))?;
        Ok(GlobalAvgPool { c: channels, h, w })
    }
}

impl Layer for GlobalAvgPool {
    fn in_size(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_size(&self) -> usize {
        self.c
    }
    fn reserve(&mut self, _max_batch: usize) {}

    fn forward(&mut self, ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        check_forward(self, x, y, n)?;
        let (c, hw) = (self.c, self.h * self.w);
        let inv = 1.0 / hw as f64;
        let ys = Disjoint::new(&mut y[..n * c]);
        // Examples in blocks over the threads, four maps' sums at a time (in order, in f64: a
        // long f32 sum loses the low bits of small terms).
        par_ranges(ctx.threads, n, (1usize << 14).div_ceil(c * hw), |r| {
            // SAFETY: the example blocks are disjoint.
            let yr = unsafe { ys.range(r.start * c..r.end * c) };
            let mut sums = [0f64; 64];
            for (xs, yo) in x[r.start * c * hw..r.end * c * hw]
                .chunks(64 * hw)
                .zip(yr.chunks_mut(64))
            {
                let s = &mut sums[..yo.len()];
                ordered_sums_f64(xs, hw, s);
                for (v, &t) in yo.iter_mut().zip(s.iter()) {
                    *v = (t * inv) as f32;
                }
            }
        });
        Ok(())
    }

    fn backward(
        &mut self,
        _ctx: Ctx,
        _x: &[f32],
        _y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        let Some(dx) = dx else { return };
        let hw = self.h * self.w;
        let scale = 1.0 / hw as f32;
        for (dxp, &d) in dx[..n * self.c * hw]
            .chunks_exact_mut(hw)
            .zip(&dy[..n * self.c])
        {
            dxp.fill(d * scale);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        format!("GlobalAvgPool() on {}x{}x{}", self.c, self.h, self.w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2x2/2 path against the general rule written out: the first maximum wins ties, a NaN wins. Values
    /// repeat often (ties) and include NaN and -inf.
    #[test]
    fn max_2x2_follows_the_general_rule() {
        for (h, w) in [
            (28, 28),
            (16, 18),
            (14, 14),
            (10, 34),
            (4, 16),
            (7, 7),
            (5, 67),
            (3, 2),
        ] {
            let g = Window::new("MaxPool2d", 2, 2, 2, 0, h, w).unwrap();
            let (hw, ohw) = (h * w, g.oh * g.ow);
            let x: Vec<f32> = (0..2 * hw)
                .map(|i| match (i * 7919) % 23 {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    v => (v % 5) as f32 - 2.0,
                })
                .collect();
            let (mut y, mut a) = (vec![0f32; 2 * ohw], vec![0u32; 2 * ohw]);
            max_forward(g, &x, &mut y, &mut a);
            for p in 0..2 {
                for oy in 0..g.oh {
                    for ox in 0..g.ow {
                        let mut best = f32::NEG_INFINITY;
                        let mut arg = 2 * oy * w + 2 * ox;
                        for iy in 2 * oy..2 * oy + 2 {
                            for ix in 2 * ox..2 * ox + 2 {
                                let v = x[p * hw + iy * w + ix];
                                if v > best || v.is_nan() {
                                    best = v;
                                    arg = iy * w + ix;
                                }
                            }
                        }
                        let o = p * ohw + oy * g.ow + ox;
                        assert_eq!(y[o].to_bits(), best.to_bits(), "{h}x{w} output {o}");
                        assert_eq!(a[o] as usize, arg, "{h}x{w} output {o}");
                    }
                }
            }
        }
    }

    /// The row-by-row backward of the 2x2/2 windows against fill and scatter: the same bits,
    /// `-0` and NaN gradients included, odd sizes' uncovered edges zero.
    #[test]
    fn max_2x2_backward_matches_the_scatter() {
        for (h, w) in [(28, 28), (14, 14), (7, 7), (5, 67), (3, 2), (9, 34)] {
            let g = Window::new("MaxPool2d", 2, 2, 2, 0, h, w).unwrap();
            let (hw, ohw) = (h * w, g.oh * g.ow);
            let x: Vec<f32> = (0..3 * hw).map(|i| ((i * 7919) % 23) as f32).collect();
            let (mut y, mut a) = (vec![0f32; 3 * ohw], vec![0u32; 3 * ohw]);
            max_forward(g, &x, &mut y, &mut a);
            let dy: Vec<f32> = (0..3 * ohw)
                .map(|i| match i % 11 {
                    0 => -0.0,
                    1 => f32::NAN,
                    v => v as f32 - 4.5,
                })
                .collect();
            let (mut fast, mut slow) = (vec![7f32; 3 * hw], vec![9f32; 3 * hw]);
            max_backward(g, &dy, &a, &mut fast);
            max_scatter(g, &dy, &a, &mut slow);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&fast), bits(&slow), "{h}x{w}");
        }
    }
}
