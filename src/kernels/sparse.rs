//! Products with a sparse left operand, for the input layer: raw MNIST pixels are about 81%
//! zero. The nonzeros of each row are gathered once per batch and used by both the forward
//! product and the weight gradient. Each row has its own fixed slot of `cols` entries, so rows
//! can be gathered and multiplied on several threads without coordination.

/// Collect the nonzeros of one row of `x` into its slot (`index`, `value`, each `cols` long);
/// returns their count.
#[inline]
pub fn gather_row(row: &[f32], index: &mut [u32], value: &mut [f32]) -> usize {
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
    /// `y (rows x o) = [bias +] x Wt` where row r of `x` is given by the first `len[r]` entries
    /// of its slot `r * cols ..` in `index`/`value`, and `wt` is `cols x o`.
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
        for (r, &l) in len.iter().enumerate() {
            let start = r * cols;
            sparse_row_times(start..start + l, index, value, wt, o, bias, &mut y[r * o..(r + 1) * o]);
        }
    }
}

/// Per-thread workspace for `sparse_weight_grad`: the nonzeros of a range of columns
/// regrouped column by column (compressed sparse columns).
#[derive(Default)]
pub struct ColumnScratch {
    start: Vec<usize>,
    row: Vec<u32>,
    value: Vec<f32>,
}

impl ColumnScratch {
    /// Room for `width` columns and up to `max_nonzeros` values.
    pub fn reserve(&mut self, width: usize, max_nonzeros: usize) {
        self.start.resize(width + 1, 0);
        self.row.resize(max_nonzeros, 0);
        self.value.resize(max_nonzeros, 0.0);
    }
}

/// `gwt[k0..k1] = (x^T dy)[k0..k1]`, rows k0..k1 of the `cols x o` weight gradient (`gwt` holds
/// just those rows), with `x` given by row slots as in `sparse_matmul`. Rows of `gwt` for
/// all-zero columns come out zero. Each column's sum runs over the batch rows in order.
pub fn sparse_weight_grad(
    index: &[u32],
    value: &[f32],
    len: &[usize],
    cols: usize,
    k0: usize,
    k1: usize,
    dy: &[f32],
    gwt: &mut [f32],
    o: usize,
    scratch: &mut ColumnScratch,
) {
    let width = k1 - k0;
    let ColumnScratch {
        start,
        row,
        value: cval,
    } = scratch;
    start[..=width].fill(0);
    for (r, &l) in len.iter().enumerate() {
        for &k in &index[r * cols..r * cols + l] {
            let k = k as usize;
            if (k0..k1).contains(&k) {
                start[k - k0 + 1] += 1;
            }
        }
    }
    for k in 0..width {
        start[k + 1] += start[k];
    }
    // start[k] serves as the fill cursor of column k, then is shifted back.
    for (r, &l) in len.iter().enumerate() {
        let slot = r * cols;
        for p in slot..slot + l {
            let k = index[p] as usize;
            if (k0..k1).contains(&k) {
                let q = start[k - k0];
                row[q] = r as u32;
                cval[q] = value[p];
                start[k - k0] += 1;
            }
        }
    }
    for k in (1..=width).rev() {
        start[k] = start[k - 1];
    }
    start[0] = 0;
    columns_times(start, row, cval, dy, gwt, width, o);
}

simd_kernel! {
    fn columns_times(
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
