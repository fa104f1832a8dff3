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

simd_kernel! {
    /// `gwt[k] = sum over the nonzeros (r, v) of column k of v * dy[r]`, each column's sum in
    /// row order; all-zero columns give zero rows.
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
