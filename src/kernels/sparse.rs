//! Products with a sparse left operand, for the input layer: raw MNIST pixels are about 81%
//! zero. The nonzeros of each row are gathered once per batch (`gather_nonzeros`) and used by
//! both the forward product and the weight gradient.

/// Collect the nonzeros of the `n x cols` matrix `x`, row by row, into `index`/`value`
/// (`row_end[r]` is one past row r's last). Returns false, leaving the lists incomplete, as
/// soon as more than `limit` nonzeros are found. `index` and `value` need `n * cols + 1` slots.
pub fn gather_nonzeros(
    x: &[f32],
    n: usize,
    cols: usize,
    limit: usize,
    index: &mut [u32],
    value: &mut [f32],
    row_end: &mut [usize],
) -> bool {
    let mut count = 0;
    for r in 0..n {
        let row = &x[r * cols..(r + 1) * cols];
        // Runs of eight zeros (image borders) are skipped whole; inside a run with a nonzero,
        // branch-free compaction: always write, advance only past nonzeros.
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
        row_end[r] = count;
        if count > limit {
            return false;
        }
    }
    true
}

/// `acc[j] (+)= sum_p value[p] * rows[index[p] * stride + j]` for `p` in `range`, with the `B`
/// accumulators in registers; `init` seeds them (the bias) or zeros.
#[inline(always)]
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

simd_kernel! {
    /// `y (n x o) = [bias +] x Wt` where `x` is given by its nonzeros (row lists from
    /// `gather_nonzeros`) and `wt` is `cols x o`.
    pub fn sparse_matmul(
        index: &[u32],
        value: &[f32],
        row_end: &[usize],
        wt: &[f32],
        bias: Option<&[f32]>,
        y: &mut [f32],
        n: usize,
        o: usize,
    ) {
        let mut start = 0;
        for r in 0..n {
            let end = row_end[r];
            sparse_row_times(start..end, index, value, wt, o, bias, &mut y[r * o..(r + 1) * o]);
            start = end;
        }
    }
}

/// Regroup the row lists of `gather_nonzeros` by column: the nonzeros of column k are
/// `col_row/col_value[col_start[k]..col_start[k + 1]]` (row index and value), rows ascending.
/// `col_start` needs `cols + 1` slots; `col_row` and `col_value` as many as there are nonzeros.
pub fn columns_of(
    index: &[u32],
    value: &[f32],
    row_end: &[usize],
    n: usize,
    cols: usize,
    col_start: &mut [usize],
    col_row: &mut [u32],
    col_value: &mut [f32],
) {
    let total = if n == 0 { 0 } else { row_end[n - 1] };
    col_start[..=cols].fill(0);
    for &k in &index[..total] {
        col_start[k as usize + 1] += 1;
    }
    for k in 0..cols {
        col_start[k + 1] += col_start[k];
    }
    // col_start[k] serves as the fill cursor of column k, then is shifted back.
    let mut start = 0;
    for r in 0..n {
        for p in start..row_end[r] {
            let k = index[p] as usize;
            let q = col_start[k];
            col_row[q] = r as u32;
            col_value[q] = value[p];
            col_start[k] += 1;
        }
        start = row_end[r];
    }
    for k in (1..=cols).rev() {
        col_start[k] = col_start[k - 1];
    }
    col_start[0] = 0;
}

simd_kernel! {
    /// `gwt (cols x o) = x^T dy` where `x` is given column by column (`columns_of`); rows of
    /// `gwt` for all-zero columns come out zero.
    pub fn sparse_weight_grad(
        col_start: &[usize],
        col_row: &[u32],
        col_value: &[f32],
        dy: &[f32],
        gwt: &mut [f32],
        cols: usize,
        o: usize,
    ) {
        for k in 0..cols {
            let (a, b) = (col_start[k], col_start[k + 1]);
            let out = &mut gwt[k * o..(k + 1) * o];
            if a == b {
                out.fill(0.0);
            } else {
                sparse_row_times(a..b, col_row, col_value, dy, o, None, out);
            }
        }
    }
}
