//! Products with a sparse left operand, for the input layer: raw MNIST pixels are about 81%
//! zero. The nonzeros of each row are gathered once per batch and used by both the forward
//! product and the weight gradient.
//!
//! The input features are split into two fixed blocks (`FeatureBlock`), each with its own rows
//! of the weight, its own lists of nonzeros and its own workspace. On two threads each block
//! stays on one core for the whole step (pixel conversion, gathering, forward partial product,
//! weight gradient, SGD update of its weight rows), so the 300 KB weight never moves between
//! cores; the partial products meet in one small sum. On one thread the same blocks run one
//! after the other, so results do not depend on the thread count.

/// Collect the nonzeros of one row of `x` into its slot (`index`, `value`, each `cols` long);
/// returns their count. The same lists on every SIMD level.
#[inline]
pub fn gather_row(row: &[f32], index: &mut [u32], value: &mut [f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        // SAFETY: the level says the CPU has AVX-512F.
        return unsafe { x86::gather_row(row, index, value) };
    }
    gather_row_portable(row, index, value)
}

/// `gather_row` on any CPU.
#[inline]
fn gather_row_portable(row: &[f32], index: &mut [u32], value: &mut [f32]) -> usize {
    let mut count = 0;
    // Runs of eight zeros (image borders) are skipped whole; inside a run with a nonzero,
    // branch-free compaction: always write, advance only past nonzeros. The write position
    // never passes the number of values seen, so the slot is never overrun.
    for (chunk_no, chunk) in row.chunks(8).enumerate() {
        if chunk.iter().all(|&v| v == 0.0) {
            continue;
        }
        for (j, &v) in chunk.iter().enumerate() {
            index[count] = (chunk_no * 8 + j) as u32;
            value[count] = v;
            count += (v != 0.0) as usize;
        }
    }
    count
}

/// `acc[j] (+)= sum_p value[p] * rows[index[p] * stride + j]` for `p` in `range`, with the `B`
/// accumulators in registers; `init` seeds them (the bias) or zeros.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dot_block<const B: usize>(
    range: std::ops::Range<usize>,
    index: &[u32],
    value: &[f32],
    rows: &[f32],
    stride: usize,
    col: usize,
    init: Option<&[f32]>,
    out: &mut [f32],
) {
    let mut acc = [0f32; B];
    if let Some(b) = init {
        acc.copy_from_slice(&b[col..col + B]);
    }
    for p in range {
        let v = value[p];
        let w = &rows[index[p] as usize * stride + col..][..B];
        for j in 0..B {
            acc[j] += v * w[j];
        }
    }
    out[col..col + B].copy_from_slice(&acc);
}

/// `out[0..stride] = [init +] sum_p value[p] * rows[index[p] * stride ..]` over `range`, in
/// register blocks of 32 (or 8) columns. A width that is not a multiple of the block ends with
/// a block that overlaps the one before: the overlapped columns are recomputed with the same
/// operations in the same order, so they get the same values, and no slow scalar tail remains.
#[inline(always)]
fn sparse_row_times(
    range: std::ops::Range<usize>,
    index: &[u32],
    value: &[f32],
    rows: &[f32],
    stride: usize,
    init: Option<&[f32]>,
    out: &mut [f32],
) {
    macro_rules! blocks {
        ($b:literal) => {{
            let mut c = 0;
            loop {
                let c0 = c.min(stride - $b);
                dot_block::<$b>(range.clone(), index, value, rows, stride, c0, init, out);
                if c0 + $b >= stride {
                    break;
                }
                c += $b;
            }
        }};
    }
    if stride >= 32 {
        blocks!(32)
    } else if stride >= 8 {
        blocks!(8)
    } else {
        for c in 0..stride {
            dot_block::<1>(range.clone(), index, value, rows, stride, c, init, out);
        }
    }
}

/// `y (rows x o) = [bias +] x Wt` where row r of `x` is given by the first `len[r]` entries
/// of its slot `r * cols ..` in `index`/`value`, and `wt` is `cols x o`. The same bits on every
/// SIMD level: each output is its init plus the products `value * w`, added one at a time in
/// the order of the nonzeros, never fused.
#[allow(clippy::too_many_arguments)]
pub fn sparse_matmul(
    index: &[u32],
    value: &[f32],
    len: &[usize],
    cols: usize,
    wt: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    o: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        for (r, &l) in len.iter().enumerate() {
            let start = r * cols;
            // SAFETY: the level says the CPU has AVX-512F.
            unsafe {
                x86::row_times(
                    start..start + l,
                    index,
                    value,
                    wt,
                    o,
                    bias,
                    &mut y[r * o..(r + 1) * o],
                )
            };
        }
        return;
    }
    sparse_matmul_portable(index, value, len, cols, wt, bias, y, o)
}

simd_kernel! {
    /// `sparse_matmul` on the AVX2 and baseline levels.
    fn sparse_matmul_portable(
        index: &[u32],
        value: &[f32],
        len: &[usize],
        cols: usize,
        wt: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        o: usize,
    ) {
        for (r, &l) in len.iter().enumerate() {
            let start = r * cols;
            sparse_row_times(start..start + l, index, value, wt, o, bias, &mut y[r * o..(r + 1) * o]);
        }
    }
}

/// One block of input features `k0..k1` of a sparse input layer, with its workspace.
#[derive(Default)]
pub struct FeatureBlock {
    /// First feature of the block.
    pub k0: usize,
    /// One past the block's last feature.
    pub k1: usize,
    /// Row r's nonzeros: `index`/`value[r * width .. r * width + len[r]]`, index relative to k0.
    index: Vec<u32>,
    value: Vec<f32>,
    len: Vec<usize>,
    /// The same nonzeros column by column, for the weight gradient.
    col_start: Vec<usize>,
    col_row: Vec<u32>,
    col_value: Vec<f32>,
}

impl FeatureBlock {
    /// The block of features `k0..k1`, without workspace (see `reserve`).
    pub fn new(k0: usize, k1: usize) -> Self {
        FeatureBlock {
            k0,
            k1,
            ..Default::default()
        }
    }

    fn width(&self) -> usize {
        self.k1 - self.k0
    }

    /// Size the workspace for batches of up to `max_batch` rows.
    pub fn reserve(&mut self, max_batch: usize) {
        let w = self.width();
        self.index.resize(max_batch * w, 0);
        self.value.resize(max_batch * w, 0.0);
        self.len.resize(max_batch, 0);
        self.col_start.resize(w + 1, 0);
        self.col_row.resize(max_batch * w, 0);
        self.col_value.resize(max_batch * w, 0.0);
    }

    /// Gather the block's nonzeros from the `n x cols` input; returns their count.
    pub fn gather(&mut self, x: &[f32], n: usize, cols: usize) -> usize {
        let w = self.width();
        let mut total = 0;
        for r in 0..n {
            let row = &x[r * cols + self.k0..r * cols + self.k1];
            let slot = r * w..(r + 1) * w;
            let l = gather_row(row, &mut self.index[slot.clone()], &mut self.value[slot]);
            self.len[r] = l;
            total += l;
        }
        total
    }

    /// `y (n x o) = [bias +] x[:, k0..k1] Wt[k0..k1, :]`, `wt` being the full `cols x o` weight.
    pub fn forward(&self, wt: &[f32], bias: Option<&[f32]>, y: &mut [f32], n: usize, o: usize) {
        sparse_matmul(
            &self.index,
            &self.value,
            &self.len[..n],
            self.width(),
            &wt[self.k0 * o..self.k1 * o],
            bias,
            y,
            o,
        );
    }

    /// Rows k0..k1 of the weight gradient `x^T dy` (`gwt` holds just those rows).
    pub fn weight_grad(&mut self, dy: &[f32], gwt: &mut [f32], n: usize, o: usize) {
        let w = self.width();
        let (start, crow, cval) = (&mut self.col_start, &mut self.col_row, &mut self.col_value);
        start[..=w].fill(0);
        for r in 0..n {
            for &k in &self.index[r * w..r * w + self.len[r]] {
                start[k as usize + 1] += 1;
            }
        }
        for k in 0..w {
            start[k + 1] += start[k];
        }
        // start[k] serves as the fill cursor of column k, then is shifted back.
        for r in 0..n {
            let slot = r * w;
            for p in slot..slot + self.len[r] {
                let k = self.index[p] as usize;
                let q = start[k];
                crow[q] = r as u32;
                cval[q] = self.value[p];
                start[k] += 1;
            }
        }
        for k in (1..=w).rev() {
            start[k] = start[k - 1];
        }
        start[0] = 0;
        columns_times(start, crow, cval, dy, gwt, w, o);
    }
}

/// `gwt[k] = sum over the nonzeros (r, v) of column k of v * dy[r]`, each column's sum in
/// row order; all-zero columns give zero rows. The same bits on every SIMD level.
fn columns_times(
    start: &[usize],
    row: &[u32],
    value: &[f32],
    dy: &[f32],
    gwt: &mut [f32],
    width: usize,
    o: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        for k in 0..width {
            let (a, b) = (start[k], start[k + 1]);
            let out = &mut gwt[k * o..(k + 1) * o];
            if a == b {
                out.fill(0.0);
            } else {
                // SAFETY: the level says the CPU has AVX-512F.
                unsafe { x86::row_times(a..b, row, value, dy, o, None, out) };
            }
        }
        return;
    }
    columns_times_portable(start, row, value, dy, gwt, width, o)
}

simd_kernel! {
    /// `columns_times` on the AVX2 and baseline levels.
    fn columns_times_portable(
        start: &[usize],
        row: &[u32],
        value: &[f32],
        dy: &[f32],
        gwt: &mut [f32],
        width: usize,
        o: usize,
    ) {
        for k in 0..width {
            let (a, b) = (start[k], start[k + 1]);
            let out = &mut gwt[k * o..(k + 1) * o];
            if a == b {
                out.fill(0.0);
            } else {
                sparse_row_times(a..b, row, value, dy, o, None, out);
            }
        }
    }
}

/// The AVX-512 kernels: the same lists and the same operations in the same order as the
/// portable ones, with all of a row's columns (up to 128) in registers at once, so that the
/// adds of 8 vectors overlap instead of waiting on one another (the portable kernel's blocks of
/// 32 columns wait about three cycles per nonzero each).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::simd::lanes as mask;
    use std::arch::x86_64::*;

    /// Lanes of f32 in a register.
    const L: usize = 16;
    /// Registers of accumulators: the widest chunk of columns done in one pass.
    const MAX_V: usize = 8;

    /// `super::gather_row_portable` with a compare and two compresses per 16 values.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gather_row(row: &[f32], index: &mut [u32], value: &mut [f32]) -> usize {
        assert!(index.len() >= row.len() && value.len() >= row.len());
        let mut count = 0;
        let step = _mm512_set1_epi32(L as i32);
        let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        let mut at = 0;
        while at < row.len() {
            let m = mask(row.len() - at);
            // SAFETY: the masked lanes lie inside `row`; the stores write `k` lanes from
            // `count`, and `count + k` never passes the values seen, at most `row.len()`.
            unsafe {
                let v = _mm512_maskz_loadu_ps(m, row.as_ptr().add(at));
                // Nonzero: not equal to zero, or unordered (a NaN counts as nonzero, as with `!=`).
                let nz = _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(m, v, _mm512_setzero_ps());
                if nz != 0 {
                    let k = nz.count_ones() as usize;
                    let store = mask(k);
                    _mm512_mask_storeu_ps(
                        value.as_mut_ptr().add(count),
                        store,
                        _mm512_maskz_compress_ps(nz, v),
                    );
                    _mm512_mask_storeu_epi32(
                        index.as_mut_ptr().add(count) as *mut i32,
                        store,
                        _mm512_maskz_compress_epi32(nz, idx),
                    );
                    count += k;
                }
            }
            idx = _mm512_add_epi32(idx, step);
            at += L;
        }
        count
    }

    /// `out[0..stride] = [init +] sum_p value[p] * rows[index[p] * stride ..]` over `range`,
    /// each column's sum in the order of `range`, products and sums rounded separately (as the
    /// portable `dot_block`).
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row_times(
        range: std::ops::Range<usize>,
        index: &[u32],
        value: &[f32],
        rows: &[f32],
        stride: usize,
        init: Option<&[f32]>,
        out: &mut [f32],
    ) {
        assert!(out.len() >= stride && init.is_none_or(|b| b.len() >= stride));
        let (index, value) = (&index[range.clone()], &value[range]);
        if let Some(&max) = index.iter().max() {
            assert!((max as usize + 1) * stride <= rows.len());
        }
        let mut c = 0;
        while c < stride {
            let width = (stride - c).min(MAX_V * L);
            // SAFETY: the checks above: every row read and the chunk of `out` are in bounds.
            unsafe {
                match width.div_ceil(L) {
                    1 => chunk::<1>(index, value, rows, stride, c, width, init, out),
                    2 => chunk::<2>(index, value, rows, stride, c, width, init, out),
                    3 => chunk::<3>(index, value, rows, stride, c, width, init, out),
                    4 => chunk::<4>(index, value, rows, stride, c, width, init, out),
                    5 => chunk::<5>(index, value, rows, stride, c, width, init, out),
                    6 => chunk::<6>(index, value, rows, stride, c, width, init, out),
                    7 => chunk::<7>(index, value, rows, stride, c, width, init, out),
                    _ => chunk::<8>(index, value, rows, stride, c, width, init, out),
                }
            }
            c += width;
        }
    }

    /// Columns `c .. c + width` (`V` registers, the last masked) of `row_times`.
    ///
    /// # Safety
    /// The CPU has AVX-512F; every `index[p] * stride + c + width <= rows.len()`,
    /// `c + width <= out.len()` and, with `init`, `<= init.len()`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn chunk<const V: usize>(
        index: &[u32],
        value: &[f32],
        rows: &[f32],
        stride: usize,
        c: usize,
        width: usize,
        init: Option<&[f32]>,
        out: &mut [f32],
    ) {
        let last = mask(width - (V - 1) * L);
        let m = |j: usize| if j + 1 == V { last } else { !0 };
        // SAFETY: the caller's contract: the masked lanes are in bounds.
        unsafe {
            let mut acc: [__m512; V] = std::array::from_fn(|j| match init {
                Some(b) => _mm512_maskz_loadu_ps(m(j), b.as_ptr().add(c + j * L)),
                None => _mm512_setzero_ps(),
            });
            for (&k, &v) in index.iter().zip(value) {
                let w = rows.as_ptr().add(k as usize * stride + c);
                let v = _mm512_set1_ps(v);
                for (j, a) in acc.iter_mut().enumerate() {
                    let wj = _mm512_maskz_loadu_ps(m(j), w.add(j * L));
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(v, wj));
                }
            }
            for (j, a) in acc.iter().enumerate() {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(c + j * L), m(j), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of `cols` values, about `zeros` of them zero, with runs of zeros and a -0.0.
    fn sparse_row(cols: usize, seed: u64, zeros: f64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        (0..cols)
            .map(|k| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 11) as f64 / (1u64 << 53) as f64;
                if k % 37 == 5 {
                    -0.0
                } else if u < zeros || (k / 20) % 3 == 0 {
                    0.0
                } else {
                    (u * 3.0 - 1.7) as f32
                }
            })
            .collect()
    }

    #[test]
    fn gather_finds_the_nonzeros_in_order() {
        for cols in [0, 1, 15, 16, 17, 33, 392, 784] {
            for seed in 0..4 {
                let row = sparse_row(cols, seed, 0.7);
                let (mut i, mut v) = (vec![0u32; cols], vec![0f32; cols]);
                let n = gather_row(&row, &mut i, &mut v);
                let want: Vec<(u32, f32)> = row
                    .iter()
                    .enumerate()
                    .filter(|(_, &x)| x != 0.0)
                    .map(|(k, &x)| (k as u32, x))
                    .collect();
                assert_eq!(n, want.len(), "cols {cols}");
                let got: Vec<(u32, f32)> = i[..n].iter().copied().zip(v[..n].to_vec()).collect();
                assert_eq!(got, want, "cols {cols}");
                let (mut pi, mut pv) = (vec![0u32; cols], vec![0f32; cols]);
                assert_eq!(gather_row_portable(&row, &mut pi, &mut pv), n);
                assert_eq!((&pi[..n], &pv[..n]), (&i[..n], &v[..n]));
            }
        }
    }

    /// The product on this CPU's level against the portable kernel and a plain loop over the
    /// nonzeros in the same order (each product and partial sum rounded to f32).
    #[test]
    fn the_product_matches_the_portable_one_bit_for_bit() {
        // Fewer widths under Miri (the portable kernel only: about a minute).
        let widths: &[usize] = if cfg!(miri) {
            &[1, 17, 100, 129]
        } else {
            &[1, 5, 15, 16, 17, 31, 33, 100, 127, 128, 129, 150, 300]
        };
        for &o in widths {
            let (rows_n, cols) = (7, 90);
            let x: Vec<f32> = (0..rows_n)
                .flat_map(|r| sparse_row(cols, r as u64 + 11 * o as u64, 0.6))
                .collect();
            let wt = sparse_row(cols * o, 99 + o as u64, 0.0);
            let bias = sparse_row(o, 5, 0.0);
            let (mut index, mut value) = (vec![0u32; rows_n * cols], vec![0f32; rows_n * cols]);
            let len: Vec<usize> = (0..rows_n)
                .map(|r| {
                    let s = r * cols..(r + 1) * cols;
                    gather_row(&x[s.clone()], &mut index[s.clone()], &mut value[s])
                })
                .collect();
            for b in [None, Some(&bias[..])] {
                let mut y = vec![f32::NAN; rows_n * o];
                let mut p = vec![f32::NAN; rows_n * o];
                sparse_matmul(&index, &value, &len, cols, &wt, b, &mut y, o);
                sparse_matmul_portable(&index, &value, &len, cols, &wt, b, &mut p, o);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y), bits(&p), "o {o}");
                for r in 0..rows_n {
                    for j in 0..o {
                        let mut acc = b.map_or(0.0, |b| b[j]);
                        for k in 0..cols {
                            let xv = x[r * cols + k];
                            if xv != 0.0 {
                                acc += xv * wt[k * o + j];
                            }
                        }
                        assert_eq!(y[r * o + j].to_bits(), acc.to_bits(), "o {o} ({r}, {j})");
                    }
                }
            }
        }
    }

    /// The weight gradient through the columns' lists against a plain loop over the rows.
    #[test]
    fn the_weight_gradient_matches_a_plain_loop_bit_for_bit() {
        let widths: &[usize] = if cfg!(miri) {
            &[3, 129]
        } else {
            &[3, 16, 100, 129]
        };
        for &o in widths {
            let (n, cols) = (9, 70);
            let x: Vec<f32> = (0..n)
                .flat_map(|r| sparse_row(cols, r as u64 + 3 * o as u64, 0.6))
                .collect();
            let dy = sparse_row(n * o, 7 + o as u64, 0.0);
            let mut block = FeatureBlock::new(20, 61);
            block.reserve(n);
            block.gather(&x, n, cols);
            let mut g = vec![f32::NAN; 41 * o];
            block.weight_grad(&dy, &mut g, n, o);
            for k in 20..61 {
                for j in 0..o {
                    let mut acc = 0f32;
                    for r in 0..n {
                        let xv = x[r * cols + k];
                        if xv != 0.0 {
                            acc += xv * dy[r * o + j];
                        }
                    }
                    assert_eq!(
                        g[(k - 20) * o + j].to_bits(),
                        acc.to_bits(),
                        "o {o} ({k}, {j})"
                    );
                }
            }
        }
    }
}
