//! Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray 2016, "Fast Algorithms for
//! Convolutional Neural Networks") for the 3x3, stride 1, padding 1 convolutions: each 2x2
//! block of the output from the 4x4 block of the input around it with 16 multiplications per
//! input channel instead of 36.
//!
//! `y = A^T [ (G g G^T) ⊙ (B^T d B) ] A` for a 3x3 filter `g` and a 4x4 input tile `d`. Summed
//! over the input channels, the element-wise products become 16 matrix products, one per
//! position ξ of the 4x4 transformed tile: `M_ξ (out x tiles) = U_ξ (out x in) V_ξ (in x tiles)`.
//! The transforms' constants are 0, ±1 and 1/2, so the only rounding beyond the direct
//! convolution's is in the additions of the transforms: results agree with the direct
//! convolution to a few units in the last place of the largest terms (tested against f64).
//!
//! The input gradient of such a layer is the same convolution of dy with the filters turned
//! by 180 degrees and the channel roles swapped (`flip`), so it uses the same code.
//!
//! One example at a time: the transformed input and output of one example (`16 (in + out)
//! tiles` values) stay in the core's cache between the transforms and the products, and the
//! work of an example never depends on how the batch is split over threads.

use super::conv::transpose;
use crate::kernels::matmul::{matmul_as, small_gemm_rows, Stride, Trans};

/// Tiles of an `h x w` map: `ceil(h/2) x ceil(w/2)`.
pub(crate) fn tiles(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// Values of one example's workspace: the example with its channels last (`hw x inp`), the
/// transformed tiles (`16 x tiles x inp`), the products (`16 x tiles x out`), the result with
/// its channels last (`hw x out`) and a zero row.
pub(crate) fn workspace_len(inp: usize, out: usize, h: usize, w: usize) -> usize {
    let (th, tw) = tiles(h, w);
    let t = th * tw;
    (h * w + 16 * t) * (inp + out) + inp
}

/// `u [16][inp][out]`: the transformed filters `G g G^T` of `weight [out][inp][3][3]`, the right
/// operand of the products (`[tiles][inp] x [inp][out]`). With `flip`, those of the input
/// gradient, whose input is the layer's output: `u [16][out][inp]` from `weight[o][c]` turned
/// by 180 degrees. In f64, rounded once.
/// The rows of each plane `u[ξ]` (input channels, or output channels with `flip`) are split
/// among up to `threads` threads; each value is computed alone, so the split changes nothing.
#[allow(clippy::needless_range_loop)] // the matrices' index notation
pub(crate) fn filter_transform(
    weight: &[f32],
    out: usize,
    inp: usize,
    flip: bool,
    u: &mut [f32],
    threads: usize,
) {
    assert!(weight.len() >= out * inp * 9 && u.len() >= 16 * out * inp);
    let plane = out * inp;
    // A plane's row is one input channel's `out` values, or with `flip` one output
    // channel's `inp` values.
    let (rows, row_len) = if flip { (out, inp) } else { (inp, out) };
    let us = crate::kernels::Disjoint::new(&mut u[..16 * plane]);
    crate::kernels::par_ranges(threads, rows, 8, |r| {
        // SAFETY: each piece takes rows `r` of the 16 planes: disjoint ranges.
        let dst: [&mut [f32]; 16] = std::array::from_fn(|p| unsafe {
            us.range(p * plane + r.start * row_len..p * plane + r.end * row_len)
        });
        for row in r.clone() {
            for col in 0..row_len {
                let (o, c) = if flip { (row, col) } else { (col, row) };
                let w = &weight[(o * inp + c) * 9..][..9];
                let g = |i: usize, j: usize| {
                    if flip {
                        w[(2 - i) * 3 + (2 - j)] as f64
                    } else {
                        w[i * 3 + j] as f64
                    }
                };
                // t = G g (4 x 3), then t G^T (4 x 4).
                let mut t = [[0f64; 3]; 4];
                for j in 0..3 {
                    let (g0, g1, g2) = (g(0, j), g(1, j), g(2, j));
                    t[0][j] = g0;
                    t[1][j] = 0.5 * (g0 + g1 + g2);
                    t[2][j] = 0.5 * (g0 - g1 + g2);
                    t[3][j] = g2;
                }
                let at = (row - r.start) * row_len + col;
                for (a, tr) in t.iter().enumerate() {
                    let v = [
                        tr[0],
                        0.5 * (tr[0] + tr[1] + tr[2]),
                        0.5 * (tr[0] - tr[1] + tr[2]),
                        tr[2],
                    ];
                    for (b, x) in v.into_iter().enumerate() {
                        dst[a * 4 + b][at] = x as f32;
                    }
                }
            }
        }
    });
}

/// Channels handled at once: one AVX-512 register of f32.
const L: usize = 16;

/// Lane by lane.
#[inline(always)]
fn add(a: [f32; L], b: [f32; L]) -> [f32; L] {
    std::array::from_fn(|l| a[l] + b[l])
}

/// Lane by lane.
#[inline(always)]
fn sub(a: [f32; L], b: [f32; L]) -> [f32; L] {
    std::array::from_fn(|l| a[l] - b[l])
}

/// The `len <= L` values at `p` (the rest zero).
///
/// # Safety
/// `p .. + len` is readable.
#[inline(always)]
unsafe fn load(p: *const f32, len: usize) -> [f32; L] {
    if len == L {
        // SAFETY: the caller's contract.
        return unsafe { std::ptr::read_unaligned(p as *const [f32; L]) };
    }
    let mut v = [0f32; L];
    for (l, x) in v[..len].iter_mut().enumerate() {
        // SAFETY: the caller's contract.
        *x = unsafe { *p.add(l) };
    }
    v
}

/// The first `len <= L` values of `v` to `p`.
///
/// # Safety
/// `p .. + len` is writable.
#[inline(always)]
unsafe fn store(p: *mut f32, v: &[f32; L], len: usize) {
    if len == L {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::write_unaligned(p as *mut [f32; L], *v) };
        return;
    }
    for (l, &x) in v[..len].iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe { *p.add(l) = x };
    }
}

/// `B^T d B` of one tile for the `len <= L` channels at `src[i]` (i = 4a + b: row a, column b
/// of the tile), into `dst + i * stride`.
///
/// # Safety
/// `src[i] .. + len` are readable and `dst + i * stride .. + len` writable for every i < 16.
#[inline(always)]
unsafe fn tile_in(src: &[*const f32; 16], dst: *mut f32, stride: usize, len: usize) {
    // SAFETY: the caller's contract.
    let p: [[f32; L]; 16] = std::array::from_fn(|i| unsafe { load(src[i], len) });
    // Columns: e = d B; then rows: B^T e.
    let mut e = [[0f32; L]; 16];
    for a in 0..4 {
        let (d0, d1, d2, d3) = (p[a * 4], p[a * 4 + 1], p[a * 4 + 2], p[a * 4 + 3]);
        e[a * 4] = sub(d0, d2);
        e[a * 4 + 1] = add(d1, d2);
        e[a * 4 + 2] = sub(d2, d1);
        e[a * 4 + 3] = sub(d1, d3);
    }
    let mut o = [[0f32; L]; 16];
    for b in 0..4 {
        let (e0, e1, e2, e3) = (e[b], e[4 + b], e[8 + b], e[12 + b]);
        o[b] = sub(e0, e2);
        o[4 + b] = add(e1, e2);
        o[8 + b] = sub(e2, e1);
        o[12 + b] = sub(e1, e3);
    }
    for (i, oi) in o.iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe { store(dst.add(i * stride), oi, len) };
    }
}

/// `v [16][tiles][c]`: `B^T d B` of every 4x4 tile `d` of `x [h][w][c]` (channels last;
/// tile (ti, tj) covers rows `2ti - 1 .. 2ti + 3` and columns `2tj - 1 .. 2tj + 3`, zero
/// outside the map), 16 channels at a time. `zero`: `c` zeros. The same bits on every SIMD
/// level (additions and subtractions in the same order).
fn input_transform(x: &[f32], c: usize, h: usize, w: usize, v: &mut [f32], zero: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512 {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(x: &[f32], c: usize, h: usize, w: usize, v: &mut [f32], zero: &[f32]) {
            // SAFETY: this function runs only where the CPU has AVX-512F.
            window_loop::<4, 16>(x, c, h, w, 1, v, zero, |s, d, st, len| unsafe {
                x86::tile_in(s, d, st, len)
            })
        }
        // SAFETY: the level says the CPU has AVX-512F.
        return unsafe { avx512(x, c, h, w, v, zero) };
    }
    // SAFETY: `window_loop` passes runs that satisfy `tile_in`'s contract.
    window_loop::<4, 16>(x, c, h, w, 1, v, zero, |s, d, st, len| unsafe {
        tile_in(s, d, st, len)
    })
}

/// The loop of `input_transform` (`S = 4`, `back = 1`: the 4x4 window around each 2x2 block)
/// and of `dy_transform` (`S = 2`, `back = 0`: the block itself) over the tiles of
/// `x [h][w][c]` (channels last): for each tile and each group of up to `L` channels, `tile`
/// gets the window's `N = S * S` runs (row-major; `zero` where the window leaves the map), the
/// tile's first destination in `out [16][tiles][c]` and the stride between its 16 rows, and
/// the group's length (the per-tile kernels' contract).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn window_loop<const S: usize, const N: usize>(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    back: usize,
    out: &mut [f32],
    zero: &[f32],
    tile: impl Fn(&[*const f32; N], *mut f32, usize, usize),
) {
    assert!(N == S * S);
    let (th, tw) = tiles(h, w);
    let t = th * tw;
    assert!(x.len() >= h * w * c && out.len() >= 16 * t * c && zero.len() >= c);
    let op = out.as_mut_ptr();
    for ti in 0..th {
        for tj in 0..tw {
            let at = ti * tw + tj;
            let (r0, c0) = ((2 * ti).wrapping_sub(back), (2 * tj).wrapping_sub(back));
            let src: [*const f32; N] = std::array::from_fn(|i| {
                let (r, col) = (r0.wrapping_add(i / S), c0.wrapping_add(i % S));
                if r < h && col < w {
                    x[(r * w + col) * c..].as_ptr()
                } else {
                    zero.as_ptr()
                }
            });
            let mut ch = 0;
            while ch < c {
                let len = L.min(c - ch);
                // SAFETY: (only pointer arithmetic) each src run is a pixel's c channels (or c
                // zeros) and ch + len <= c; the destination runs (xi * t + at) * c + ch .. + len
                // lie in out.
                let s = src.map(|p| unsafe { p.add(ch) });
                tile(&s, unsafe { op.add(at * c + ch) }, t * c, len);
                ch += len;
            }
        }
    }
}

/// `A^T M A` (+ `bias`) of one tile for the `len <= L` channels at `src + i * stride`, into
/// the 2x2 outputs `dst[j]` (j = 2s + r), `None` outside the map.
///
/// # Safety
/// `src + i * stride .. + len` readable for i < 16, `bias .. + len` readable, the `dst` runs
/// writable for `len`.
#[inline(always)]
unsafe fn tile_out(
    src: *const f32,
    stride: usize,
    bias: &[f32; L],
    dst: &[Option<*mut f32>; 4],
    len: usize,
) {
    // SAFETY: the caller's contract.
    let p: [[f32; L]; 16] = std::array::from_fn(|i| unsafe { load(src.add(i * stride), len) });
    // Rows: q = A^T M (2 x 4); then columns: q A (2 x 2).
    let mut q = [[0f32; L]; 8];
    for b in 0..4 {
        let (m0, m1, m2, m3) = (p[b], p[4 + b], p[8 + b], p[12 + b]);
        q[b] = add(add(m0, m1), m2);
        q[4 + b] = sub(sub(m1, m2), m3);
    }
    let mut o = [[0f32; L]; 4];
    for s in 0..2 {
        let (q0, q1, q2, q3) = (q[s * 4], q[s * 4 + 1], q[s * 4 + 2], q[s * 4 + 3]);
        o[s * 2] = add(add(add(q0, q1), q2), *bias);
        o[s * 2 + 1] = add(sub(sub(q1, q2), q3), *bias);
    }
    for (oi, d) in o.iter().zip(dst) {
        if let Some(d) = *d {
            // SAFETY: the caller's contract.
            unsafe { store(d, oi, len) };
        }
    }
}

/// `y [h][w][k] = A^T M A` (+ `bias`) of the products `m [16][tiles][k]` (channels last). The
/// same bits on every SIMD level.
fn output_transform(m: &[f32], k: usize, h: usize, w: usize, bias: Option<&[f32]>, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512 {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(
            m: &[f32],
            k: usize,
            h: usize,
            w: usize,
            bias: Option<&[f32]>,
            y: &mut [f32],
        ) {
            // SAFETY: this function runs only where the CPU has AVX-512F.
            output_loop(m, k, h, w, bias, y, |s, st, b, d, len| unsafe {
                x86::tile_out(s, st, b, d, len)
            })
        }
        // SAFETY: the level says the CPU has AVX-512F.
        return unsafe { avx512(m, k, h, w, bias, y) };
    }
    // SAFETY: `output_loop` passes runs that satisfy `tile_out`'s contract.
    output_loop(m, k, h, w, bias, y, |s, st, b, d, len| unsafe {
        tile_out(s, st, b, d, len)
    })
}

/// `output_transform`'s loop over the tiles, with `tile` the per-tile kernel (`tile_out`'s
/// contract).
#[inline(always)]
fn output_loop(
    m: &[f32],
    k: usize,
    h: usize,
    w: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    tile: impl Fn(*const f32, usize, &[f32; L], &[Option<*mut f32>; 4], usize),
) {
    let (th, tw) = tiles(h, w);
    let t = th * tw;
    assert!(m.len() >= 16 * t * k && y.len() >= h * w * k);
    assert!(bias.is_none_or(|b| b.len() >= k));
    let yp = y.as_mut_ptr();
    let mut ch = 0;
    while ch < k {
        let len = L.min(k - ch);
        let mut bv = [0f32; L];
        if let Some(b) = bias {
            bv[..len].copy_from_slice(&b[ch..ch + len]);
        }
        for ti in 0..th {
            for tj in 0..tw {
                let at = ti * tw + tj;
                let dst: [Option<*mut f32>; 4] = std::array::from_fn(|j| {
                    let (r, col) = (2 * ti + j / 2, 2 * tj + j % 2);
                    // SAFETY: (pointer arithmetic) inside y: (r * w + col) * k + ch + len <=
                    // h * w * k.
                    (r < h && col < w).then(|| unsafe { yp.add((r * w + col) * k + ch) })
                });
                // SAFETY: (pointer arithmetic) m holds (xi * t + at) * k + ch .. + len for
                // xi < 16.
                tile(
                    unsafe { m.as_ptr().add(at * k + ch) },
                    t * k,
                    &bv,
                    &dst,
                    len,
                );
            }
        }
        ch += len;
    }
}

/// The per-tile kernels on AVX-512 registers: the same operations in the same order as
/// `tile_in` and `tile_out`, with masked loads and stores for a last group of fewer than 16
/// channels.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::L;
    use crate::kernels::simd::lanes;
    use std::arch::x86_64::*;

    /// `super::tile_in` on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `super::tile_in`'s contract.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_in(src: &[*const f32; 16], dst: *mut f32, stride: usize, len: usize) {
        let mask = lanes(len);
        // SAFETY: the caller's contract: the masked lanes are readable / writable.
        unsafe {
            let p: [__m512; 16] = std::array::from_fn(|i| _mm512_maskz_loadu_ps(mask, src[i]));
            let mut e = [_mm512_setzero_ps(); 16];
            for a in 0..4 {
                let (d0, d1, d2, d3) = (p[a * 4], p[a * 4 + 1], p[a * 4 + 2], p[a * 4 + 3]);
                e[a * 4] = _mm512_sub_ps(d0, d2);
                e[a * 4 + 1] = _mm512_add_ps(d1, d2);
                e[a * 4 + 2] = _mm512_sub_ps(d2, d1);
                e[a * 4 + 3] = _mm512_sub_ps(d1, d3);
            }
            for b in 0..4 {
                let (e0, e1, e2, e3) = (e[b], e[4 + b], e[8 + b], e[12 + b]);
                _mm512_mask_storeu_ps(dst.add(b * stride), mask, _mm512_sub_ps(e0, e2));
                _mm512_mask_storeu_ps(dst.add((4 + b) * stride), mask, _mm512_add_ps(e1, e2));
                _mm512_mask_storeu_ps(dst.add((8 + b) * stride), mask, _mm512_sub_ps(e2, e1));
                _mm512_mask_storeu_ps(dst.add((12 + b) * stride), mask, _mm512_sub_ps(e1, e3));
            }
        }
    }

    /// `super::tile_dy` on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `super::tile_dy`'s contract.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_dy(src: &[*const f32; 4], dst: *mut f32, stride: usize, len: usize) {
        let mask = lanes(len);
        // SAFETY: the caller's contract: the masked lanes are readable / writable.
        unsafe {
            let p: [__m512; 4] = std::array::from_fn(|j| _mm512_maskz_loadu_ps(mask, src[j]));
            // -v as 0 - v would turn +0 into +0 where -v is -0: flip the sign bit instead.
            let neg = |v: __m512| {
                _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(v),
                    _mm512_set1_epi32(i32::MIN),
                ))
            };
            let t = [
                p[0],
                p[1],
                _mm512_add_ps(p[0], p[2]),
                _mm512_add_ps(p[1], p[3]),
                _mm512_sub_ps(p[0], p[2]),
                _mm512_sub_ps(p[1], p[3]),
                neg(p[2]),
                neg(p[3]),
            ];
            for a in 0..4 {
                let (t0, t1) = (t[2 * a], t[2 * a + 1]);
                let o = [t0, _mm512_add_ps(t0, t1), _mm512_sub_ps(t0, t1), neg(t1)];
                for (b, &ob) in o.iter().enumerate() {
                    _mm512_mask_storeu_ps(dst.add((a * 4 + b) * stride), mask, ob);
                }
            }
        }
    }

    /// `super::tile_out` on AVX-512.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `super::tile_out`'s contract.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_out(
        src: *const f32,
        stride: usize,
        bias: &[f32; L],
        dst: &[Option<*mut f32>; 4],
        len: usize,
    ) {
        let mask = lanes(len);
        // SAFETY: the caller's contract: the masked lanes are readable / writable.
        unsafe {
            let p: [__m512; 16] =
                std::array::from_fn(|i| _mm512_maskz_loadu_ps(mask, src.add(i * stride)));
            let bv = _mm512_loadu_ps(bias.as_ptr());
            let mut q = [_mm512_setzero_ps(); 8];
            for b in 0..4 {
                let (m0, m1, m2, m3) = (p[b], p[4 + b], p[8 + b], p[12 + b]);
                q[b] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
                q[4 + b] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
            }
            for s in 0..2 {
                let (q0, q1, q2, q3) = (q[s * 4], q[s * 4 + 1], q[s * 4 + 2], q[s * 4 + 3]);
                let o0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(q0, q1), q2), bv);
                let o1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(q1, q2), q3), bv);
                if let Some(d) = dst[s * 2] {
                    _mm512_mask_storeu_ps(d, mask, o0);
                }
                if let Some(d) = dst[s * 2 + 1] {
                    _mm512_mask_storeu_ps(d, mask, o1);
                }
            }
        }
    }
}

/// `A dy A^T` of one tile: the 4x4 gradient of the products from the 2x2 block of dy at
/// `src[j]` (j = 2s + r; `zero` outside the map), for `len <= L` channels, into
/// `dst + i * stride`.
///
/// # Safety
/// `src[j] .. + len` readable for j < 4, `dst + i * stride .. + len` writable for i < 16.
#[inline(always)]
unsafe fn tile_dy(src: &[*const f32; 4], dst: *mut f32, stride: usize, len: usize) {
    // SAFETY: the caller's contract.
    let p: [[f32; L]; 4] = std::array::from_fn(|j| unsafe { load(src[j], len) });
    // Rows: t = A dy (4 x 2); then columns: t A^T (4 x 4).
    let neg = |a: [f32; L]| a.map(|v| -v);
    let t = [
        p[0],
        p[1],
        add(p[0], p[2]),
        add(p[1], p[3]),
        sub(p[0], p[2]),
        sub(p[1], p[3]),
        neg(p[2]),
        neg(p[3]),
    ];
    for a in 0..4 {
        let (t0, t1) = (t[2 * a], t[2 * a + 1]);
        let o = [t0, add(t0, t1), sub(t0, t1), neg(t1)];
        for (b, ob) in o.iter().enumerate() {
            // SAFETY: the caller's contract.
            unsafe { store(dst.add((a * 4 + b) * stride), ob, len) };
        }
    }
}

/// `g [16][tiles][k]`: `A dy A^T` of every 2x2 block of `dy [h][w][k]` (channels last; zero
/// outside the map), the gradient of the products `m` of `output_transform`. The same bits on
/// every SIMD level.
fn dy_transform(dy: &[f32], k: usize, h: usize, w: usize, g: &mut [f32], zero: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::simd::level() == crate::kernels::simd::Level::Avx512 {
        #[target_feature(enable = "avx512f")]
        unsafe fn avx512(dy: &[f32], k: usize, h: usize, w: usize, g: &mut [f32], zero: &[f32]) {
            // SAFETY: this function runs only where the CPU has AVX-512F.
            window_loop::<2, 4>(dy, k, h, w, 0, g, zero, |s, d, st, len| unsafe {
                x86::tile_dy(s, d, st, len)
            })
        }
        // SAFETY: the level says the CPU has AVX-512F.
        return unsafe { avx512(dy, k, h, w, g, zero) };
    }
    // SAFETY: `window_loop` passes runs that satisfy `tile_dy`'s contract.
    window_loop::<2, 4>(dy, k, h, w, 0, g, zero, |s, d, st, len| unsafe {
        tile_dy(s, d, st, len)
    })
}

/// Values of one example's workspace for `weight_grad`: the example's channel block and dy
/// with their channels last, their transforms, and a zero row.
pub(crate) fn grad_workspace_len(inp: usize, out: usize, h: usize, w: usize) -> usize {
    let (th, tw) = tiles(h, w);
    (h * w + 16 * th * tw) * (inp + out) + inp.max(out)
}

/// One example's contribution to the transformed weight gradient: `du [16][inp][out] (+)=
/// V^T G` per position ξ, with `V` the input transform of `x [inp][h][w]` (a block of the
/// layer's input channels) and `G` the transform of `dy [out][h][w]` (`dy_transform`).
/// `accumulate`: add to `du` (else overwrite). `ws`: `grad_workspace_len` values. The
/// products run on the kernel a block of `path_rows` input channels calls for (the layer's
/// whole count), so that a block of channels gets the bits the whole would.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad(
    x: &[f32],
    inp: usize,
    dy: &[f32],
    out: usize,
    h: usize,
    w: usize,
    du: &mut [f32],
    accumulate: bool,
    ws: &mut [f32],
    path_rows: usize,
) {
    let (th, tw) = tiles(h, w);
    let (t, hw) = (th * tw, h * w);
    assert!(ws.len() >= grad_workspace_len(inp, out, h, w) && du.len() >= 16 * inp * out);
    let (xt, rest) = ws.split_at_mut(hw * inp);
    let (v, rest) = rest.split_at_mut(16 * t * inp);
    let (dyt, rest) = rest.split_at_mut(hw * out);
    let (g, zero) = rest.split_at_mut(16 * t * out);
    zero.fill(0.0);
    transpose(&x[..inp * hw], inp, hw, xt);
    input_transform(xt, inp, h, w, v, zero);
    transpose(&dy[..out * hw], out, hw, dyt);
    dy_transform(dyt, out, h, w, g, zero);
    for xi in 0..16 {
        let (dux, vx, gx) = (
            &mut du[xi * inp * out..][..inp * out],
            &v[xi * t * inp..][..t * inp],
            &g[xi * t * out..][..t * out],
        );
        // du_ξ (inp x out) = V_ξ^T (inp x t) G_ξ (t x out): V_ξ's columns are its rows.
        matmul_as(dux, vx, gx, inp, t, out, Trans::A, accumulate, 1, path_rows);
    }
}

/// The 3x3 weight gradient from the transformed one: `dwt [inp * 9][out] = G^T du G` for each
/// input channel c and output channel o, in f64, rounded once. Row `c * 9 + 3i + j` holds tap
/// (i, j): the layout of the conv layer's transposed partial gradients.
#[allow(clippy::needless_range_loop)] // the matrices' index notation
pub(crate) fn grad_filter(du: &[f32], inp: usize, out: usize, dwt: &mut [f32]) {
    assert!(du.len() >= 16 * inp * out && dwt.len() >= 9 * inp * out);
    let plane = inp * out;
    for c in 0..inp {
        for o in 0..out {
            let d = |a: usize, b: usize| du[(a * 4 + b) * plane + c * out + o] as f64;
            // s = G^T du (3 x 4), then s G (3 x 3).
            let mut s = [[0f64; 4]; 3];
            for b in 0..4 {
                let (d0, d1, d2, d3) = (d(0, b), d(1, b), d(2, b), d(3, b));
                s[0][b] = d0 + 0.5 * (d1 + d2);
                s[1][b] = 0.5 * (d1 - d2);
                s[2][b] = 0.5 * (d1 + d2) + d3;
            }
            for (i, r) in s.iter().enumerate() {
                let row = [
                    r[0] + 0.5 * (r[1] + r[2]),
                    0.5 * (r[1] - r[2]),
                    0.5 * (r[1] + r[2]) + r[3],
                ];
                for (j, v) in row.into_iter().enumerate() {
                    dwt[(c * 9 + i * 3 + j) * out + o] = v as f32;
                }
            }
        }
    }
}

/// One example of a 3x3, stride 1, padding 1 convolution: `y [out][h][w]` from
/// `x [inp][h][w]` and the transformed filters `u [16][inp][out]` (`filter_transform`), plus
/// `bias`. `ws`: at least `workspace_len(inp, out, h, w)` values.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3(
    x: &[f32],
    inp: usize,
    out: usize,
    h: usize,
    w: usize,
    u: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut [f32],
) {
    let (th, tw) = tiles(h, w);
    let (t, hw) = (th * tw, h * w);
    assert!(ws.len() >= workspace_len(inp, out, h, w) && u.len() >= 16 * out * inp);
    let (xt, rest) = ws.split_at_mut(hw * inp);
    let (v, rest) = rest.split_at_mut(16 * t * inp);
    let (m, rest) = rest.split_at_mut(16 * t * out);
    let (yt, zero) = rest.split_at_mut(hw * out);
    let zero = &mut zero[..inp];
    zero.fill(0.0);
    transpose(&x[..inp * hw], inp, hw, xt);
    input_transform(xt, inp, h, w, v, zero);
    for xi in 0..16 {
        let (mx, vx, ux) = (
            &mut m[xi * t * out..][..t * out],
            &v[xi * t * inp..][..t * inp],
            &u[xi * inp * out..][..inp * out],
        );
        small_gemm_rows(mx, vx, Stride(inp), ux, Stride(out), t, inp, out, false);
    }
    output_transform(m, out, h, w, bias, yt);
    transpose(yt, hw, out, &mut y[..out * hw]);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The direct convolution in f64, and the sum of the terms' magnitudes (the scale of the
    /// rounding error of any order of the additions).
    fn direct(
        x: &[f32],
        wt: &[f32],
        inp: usize,
        out: usize,
        h: usize,
        w: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let mut y = vec![0f64; out * h * w];
        let mut mag = vec![0f64; out * h * w];
        for o in 0..out {
            for r in 0..h {
                for col in 0..w {
                    let (mut s, mut a) = (0f64, 0f64);
                    for c in 0..inp {
                        for i in 0..3 {
                            for j in 0..3 {
                                let (rr, cc) = ((r + i).wrapping_sub(1), (col + j).wrapping_sub(1));
                                if rr < h && cc < w {
                                    let t = wt[((o * inp + c) * 3 + i) * 3 + j] as f64
                                        * x[(c * h + rr) * w + cc] as f64;
                                    s += t;
                                    a += t.abs();
                                }
                            }
                        }
                    }
                    y[(o * h + r) * w + col] = s;
                    mag[(o * h + r) * w + col] = a;
                }
            }
        }
        (y, mag)
    }

    /// Forward and the flipped (input gradient) form against the f64 direct convolution, on
    /// even, odd and tiny maps: every element within 8 units of f32 rounding of its terms'
    /// magnitude. A wrong constant in any transform, or a tile read one column off, is far
    /// outside that.
    #[test]
    fn winograd_matches_the_direct_convolution() {
        let shapes: &[(usize, usize, usize, usize)] = if cfg!(miri) {
            &[(2, 3, 5, 4)]
        } else {
            &[
                (3, 5, 8, 8),
                (16, 16, 28, 28),
                (4, 6, 7, 7),
                (5, 3, 1, 3),
                (2, 2, 2, 1),
                (7, 9, 14, 9),
            ]
        };
        for &(inp, out, h, w) in shapes {
            let x = values(inp * h * w, (inp * 31 + h) as u64);
            let wt = values(out * inp * 9, (out * 17 + w) as u64);
            let bias = values(out, 5);
            let mut u = vec![0f32; 16 * out * inp];
            filter_transform(&wt, out, inp, false, &mut u, 3);
            let mut ws = vec![f32::NAN; workspace_len(inp, out, h, w)];
            let mut y = vec![f32::NAN; out * h * w];
            conv3x3(&x, inp, out, h, w, &u, Some(&bias), &mut y, &mut ws);
            let (want, mag) = direct(&x, &wt, inp, out, h, w);
            for i in 0..y.len() {
                let want = want[i] + bias[i / (h * w)] as f64;
                let tol = 8.0 * f32::EPSILON as f64 * (mag[i] + 1.0);
                assert!(
                    (y[i] as f64 - want).abs() <= tol,
                    "{inp}->{out} {h}x{w} at {i}: {} against {want}",
                    y[i]
                );
            }
            // The input gradient: dx = conv(dy, flipped filters), out and in swapped.
            let dy = values(out * h * w, 99);
            filter_transform(&wt, out, inp, true, &mut u, 1);
            let mut ws = vec![f32::NAN; workspace_len(out, inp, h, w)];
            let mut dx = vec![f32::NAN; inp * h * w];
            conv3x3(&dy, out, inp, h, w, &u, None, &mut dx, &mut ws);
            // Reference: dx[c][p] = sum_o sum_ij w[o][c][i][j] dy[o][p - (i - 1, j - 1)].
            for c in 0..inp {
                for r in 0..h {
                    for col in 0..w {
                        let (mut s, mut a) = (0f64, 0f64);
                        for o in 0..out {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (rr, cc) =
                                        ((r + 1).wrapping_sub(i), (col + 1).wrapping_sub(j));
                                    if rr < h && cc < w {
                                        let t = wt[((o * inp + c) * 3 + i) * 3 + j] as f64
                                            * dy[(o * h + rr) * w + cc] as f64;
                                        s += t;
                                        a += t.abs();
                                    }
                                }
                            }
                        }
                        let got = dx[(c * h + r) * w + col] as f64;
                        let tol = 8.0 * f32::EPSILON as f64 * (a + 1.0);
                        assert!(
                            (got - s).abs() <= tol,
                            "dx {inp}<-{out} {h}x{w}: {got} against {s}"
                        );
                    }
                }
            }
        }
    }

    /// The weight gradient by transforms against the f64 correlation of dy and x, on even, odd
    /// and tiny maps, summed over two examples (the second accumulated): every element within
    /// 8 units of f32 rounding of its terms' magnitude.
    #[test]
    fn winograd_weight_gradient_matches_the_direct_one() {
        let shapes: &[(usize, usize, usize, usize)] = if cfg!(miri) {
            &[(2, 3, 3, 4)]
        } else {
            &[
                (3, 5, 8, 8),
                (16, 16, 28, 28),
                (4, 6, 7, 7),
                (5, 3, 1, 3),
                (2, 2, 2, 1),
                (7, 17, 14, 9),
            ]
        };
        for &(inp, out, h, w) in shapes {
            let hw = h * w;
            let x = values(2 * inp * hw, (inp * 13 + h) as u64);
            let dy = values(2 * out * hw, (out * 7 + w) as u64);
            let mut du = vec![f32::NAN; 16 * inp * out];
            let mut ws = vec![f32::NAN; grad_workspace_len(inp, out, h, w)];
            for e in 0..2 {
                let (xe, dye) = (
                    &x[e * inp * hw..][..inp * hw],
                    &dy[e * out * hw..][..out * hw],
                );
                weight_grad(xe, inp, dye, out, h, w, &mut du, e > 0, &mut ws, inp);
            }
            let mut dwt = vec![f32::NAN; 9 * inp * out];
            grad_filter(&du, inp, out, &mut dwt);
            for o in 0..out {
                for c in 0..inp {
                    for i in 0..3 {
                        for j in 0..3 {
                            let (mut s, mut a) = (0f64, 0f64);
                            for e in 0..2 {
                                for r in 0..h {
                                    for col in 0..w {
                                        let (rr, cc) =
                                            ((r + i).wrapping_sub(1), (col + j).wrapping_sub(1));
                                        if rr < h && cc < w {
                                            let t = dy[((e * out + o) * h + r) * w + col] as f64
                                                * x[((e * inp + c) * h + rr) * w + cc] as f64;
                                            s += t;
                                            a += t.abs();
                                        }
                                    }
                                }
                            }
                            let got = dwt[(c * 9 + i * 3 + j) * out + o] as f64;
                            let tol = 8.0 * f32::EPSILON as f64 * (a + 1.0);
                            assert!(
                                (got - s).abs() <= tol,
                                "dW {inp}->{out} {h}x{w} [{o}][{c}][{i}][{j}]: {got} against {s}"
                            );
                        }
                    }
                }
            }
        }
    }
}
