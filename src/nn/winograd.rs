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

use crate::kernels::matmul::{small_gemm_rows, Stride};

/// Tiles of an `h x w` map: `ceil(h/2) x ceil(w/2)`.
pub(crate) fn tiles(h: usize, w: usize) -> (usize, usize) {
    (h.div_ceil(2), w.div_ceil(2))
}

/// Values of one example's workspace: the transformed input (`16 x inp x tiles`), the products
/// (`16 x out x tiles`) and the transforms' row buffers.
pub(crate) fn workspace_len(inp: usize, out: usize, h: usize, w: usize) -> usize {
    let (th, tw) = tiles(h, w);
    16 * (inp + out) * th * tw + scratch_len(tw)
}

fn scratch_len(tw: usize) -> usize {
    // Four even and four odd padded rows (tw + 1 each), then 16 transformed rows (tw each).
    8 * (tw + 1) + 16 * tw
}

/// `u [16][out][inp]`: the transformed filters `G g G^T` of `weight [out][inp][3][3]`; with
/// `flip`, those of the input gradient: `u[ξ][c][o]` from `weight[o][c]` turned by 180
/// degrees (then `out` and `inp` name the weight's own dimensions, and `u` is `[16][inp][out]`).
/// In f64, rounded once.
pub(crate) fn filter_transform(weight: &[f32], out: usize, inp: usize, flip: bool, u: &mut [f32]) {
    assert!(weight.len() >= out * inp * 9 && u.len() >= 16 * out * inp);
    let plane = out * inp;
    for o in 0..out {
        for c in 0..inp {
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
            let at = if flip { c * out + o } else { o * inp + c };
            for (a, r) in t.iter().enumerate() {
                let row = [
                    r[0],
                    0.5 * (r[0] + r[1] + r[2]),
                    0.5 * (r[0] - r[1] + r[2]),
                    r[2],
                ];
                for (b, v) in row.into_iter().enumerate() {
                    u[(a * 4 + b) * plane + at] = v as f32;
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// `v [16][c][tiles]`: `B^T d B` of every 4x4 tile `d` of the `c` planes of `x [c][h][w]`
    /// (tile (ti, tj) covers rows `2ti - 1 .. 2ti + 3` and columns `2tj - 1 .. 2tj + 3`, zero
    /// outside the map).
    fn input_transform(x: &[f32], c: usize, h: usize, w: usize, v: &mut [f32], scratch: &mut [f32]) {
        let (th, tw) = tiles(h, w);
        let t = th * tw;
        assert!(x.len() >= c * h * w && v.len() >= 16 * c * t);
        assert!(scratch.len() >= scratch_len(tw));
        let (eo, ct) = scratch.split_at_mut(8 * (tw + 1));
        for ch in 0..c {
            let plane = &x[ch * h * w..][..h * w];
            for ti in 0..th {
                // Row a of the tiles, split into even and odd columns of the padded row
                // (padded column q is the map's column q - 1).
                for a in 0..4 {
                    let (e, o) = eo[a * 2 * (tw + 1)..][..2 * (tw + 1)].split_at_mut(tw + 1);
                    let r = (2 * ti + a).wrapping_sub(1);
                    if r >= h {
                        e.fill(0.0);
                        o.fill(0.0);
                        continue;
                    }
                    let row = &plane[r * w..][..w];
                    // e[j] = padded[2j] = row[2j - 1], o[j] = padded[2j + 1] = row[2j].
                    e[0] = 0.0;
                    for j in 1..=tw {
                        e[j] = row.get(2 * j - 1).copied().unwrap_or(0.0);
                    }
                    for j in 0..=tw {
                        o[j] = row.get(2 * j).copied().unwrap_or(0.0);
                    }
                }
                // Columns: d B for each tile row a, then rows: B^T (d B).
                for a in 0..4 {
                    let (e, o) = eo[a * 2 * (tw + 1)..][..2 * (tw + 1)].split_at(tw + 1);
                    let (c01, c23) = ct[a * 4 * tw..][..4 * tw].split_at_mut(2 * tw);
                    let (c0, c1) = c01.split_at_mut(tw);
                    let (c2, c3) = c23.split_at_mut(tw);
                    for j in 0..tw {
                        let (p0, p1, p2, p3) = (e[j], o[j], e[j + 1], o[j + 1]);
                        c0[j] = p0 - p2;
                        c1[j] = p1 + p2;
                        c2[j] = p2 - p1;
                        c3[j] = p1 - p3;
                    }
                }
                let at = ch * t + ti * tw;
                for b in 0..4 {
                    let row = |a: usize| &ct[(a * 4 + b) * tw..][..tw];
                    let (r0, r1, r2, r3) = (row(0), row(1), row(2), row(3));
                    let dst = |a: usize| {
                        let at = (a * 4 + b) * c * t + at;
                        at..at + tw
                    };
                    let d = dst(0);
                    for (j, y) in v[d].iter_mut().enumerate() {
                        *y = r0[j] - r2[j];
                    }
                    let d = dst(1);
                    for (j, y) in v[d].iter_mut().enumerate() {
                        *y = r1[j] + r2[j];
                    }
                    let d = dst(2);
                    for (j, y) in v[d].iter_mut().enumerate() {
                        *y = r2[j] - r1[j];
                    }
                    let d = dst(3);
                    for (j, y) in v[d].iter_mut().enumerate() {
                        *y = r1[j] - r3[j];
                    }
                }
            }
        }
    }
}

crate::simd_kernel! {
    /// `y [out][h][w] = A^T M A` (+ `bias` per plane) of the products `m [16][out][tiles]`.
    fn output_transform(
        m: &[f32],
        out: usize,
        h: usize,
        w: usize,
        bias: Option<&[f32]>,
        y: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (th, tw) = tiles(h, w);
        let t = th * tw;
        assert!(m.len() >= 16 * out * t && y.len() >= out * h * w);
        assert!(scratch.len() >= scratch_len(tw));
        let q = &mut scratch[..8 * tw];
        for k in 0..out {
            let bv = bias.map_or(0.0, |b| b[k]);
            let plane = &mut y[k * h * w..][..h * w];
            for ti in 0..th {
                let at = k * t + ti * tw;
                let mrow = |a: usize, b: usize| &m[(a * 4 + b) * out * t + at..][..tw];
                // Rows: A^T M (2 x 4), q[s * 4 + b].
                for b in 0..4 {
                    let (m0, m1, m2, m3) = (mrow(0, b), mrow(1, b), mrow(2, b), mrow(3, b));
                    let (q0, q1) = q.split_at_mut(4 * tw);
                    let (q0, q1) = (&mut q0[b * tw..][..tw], &mut q1[b * tw..][..tw]);
                    for j in 0..tw {
                        q0[j] = m0[j] + m1[j] + m2[j];
                        q1[j] = m1[j] - m2[j] - m3[j];
                    }
                }
                // Columns: (A^T M) A, into rows 2ti and 2ti + 1 of the plane.
                for s in 0..2 {
                    let r = 2 * ti + s;
                    if r >= h {
                        break;
                    }
                    let qs = &q[s * 4 * tw..][..4 * tw];
                    let (a0, a1, a2, a3) = (&qs[..tw], &qs[tw..2 * tw], &qs[2 * tw..3 * tw], &qs[3 * tw..]);
                    let row = &mut plane[r * w..][..w];
                    let (pairs, rest) = row.split_at_mut(w / 2 * 2);
                    for (j, p) in pairs.chunks_exact_mut(2).enumerate() {
                        p[0] = (a0[j] + a1[j] + a2[j]) + bv;
                        p[1] = (a1[j] - a2[j] - a3[j]) + bv;
                    }
                    if let Some(last) = rest.first_mut() {
                        let j = w / 2;
                        *last = (a0[j] + a1[j] + a2[j]) + bv;
                    }
                }
            }
        }
    }
}

/// One example of a 3x3, stride 1, padding 1 convolution: `y [out][h][w]` from
/// `x [inp][h][w]` and the transformed filters `u [16][out][inp]` (`filter_transform`), plus
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
    let t = th * tw;
    assert!(ws.len() >= workspace_len(inp, out, h, w) && u.len() >= 16 * out * inp);
    let (v, rest) = ws.split_at_mut(16 * inp * t);
    let (m, scratch) = rest.split_at_mut(16 * out * t);
    input_transform(x, inp, h, w, v, scratch);
    for xi in 0..16 {
        let (mx, ux, vx) = (
            &mut m[xi * out * t..][..out * t],
            &u[xi * out * inp..][..out * inp],
            &v[xi * inp * t..][..inp * t],
        );
        small_gemm_rows(mx, ux, Stride(inp), vx, Stride(t), out, inp, t, false);
    }
    output_transform(m, out, h, w, bias, y, scratch);
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
    fn direct(x: &[f32], wt: &[f32], inp: usize, out: usize, h: usize, w: usize) -> (Vec<f64>, Vec<f64>) {
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
            &[(3, 5, 8, 8), (16, 16, 28, 28), (4, 6, 7, 7), (5, 3, 1, 3), (2, 2, 2, 1), (7, 9, 14, 9)]
        };
        for &(inp, out, h, w) in shapes {
            let x = values(inp * h * w, (inp * 31 + h) as u64);
            let wt = values(out * inp * 9, (out * 17 + w) as u64);
            let bias = values(out, 5);
            let mut u = vec![0f32; 16 * out * inp];
            filter_transform(&wt, out, inp, false, &mut u);
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
            filter_transform(&wt, out, inp, true, &mut u);
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
                                    let (rr, cc) = ((r + 1).wrapping_sub(i), (col + 1).wrapping_sub(j));
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
                        assert!((got - s).abs() <= tol, "dx {inp}<-{out} {h}x{w}: {got} against {s}");
                    }
                }
            }
        }
    }
}
