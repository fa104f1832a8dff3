//! Matrix multiply on row-major f32 slices, wrapping the `gemm` crate (faer's kernels).
//!
//! Parallelism is an explicit argument: small products stay on one thread, because fork-join
//! costs more than it gives on tiny matrices.

/// Which operand is stored transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trans {
    /// Neither: A is m x k, B is k x n.
    No,
    /// A is stored k x m (we use its transpose).
    A,
    /// B is stored n x k (we use its transpose).
    B,
}

/// Products with fewer multiply-adds than this stay on one thread.
const PARALLEL_MIN_FLOPS: usize = 1 << 17;

/// `c (m x n) = [c +] op(a) * op(b)`, all row-major. `accumulate` adds to `c` instead of
/// overwriting it. With `threads > 1` and a large enough product, the rows of `c` are split in
/// blocks computed on up to `threads` threads (`team::par_for`); the results do not depend on
/// the split.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans: Trans,
    accumulate: bool,
    threads: usize,
) {
    matmul_as(c, a, b, m, k, n, trans, accumulate, threads, m);
}

/// `matmul` on the kernel that a product of `path_rows` rows (and the same `k` and `n`) would
/// use: for computing a block of rows of a larger product, elsewhere, with the same arithmetic
/// as the whole product (the conv layers' weight gradients split by rows over threads).
#[allow(clippy::too_many_arguments)]
pub fn matmul_as(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    trans: Trans,
    accumulate: bool,
    threads: usize,
    path_rows: usize,
) {
    assert!(c.len() >= m * n, "matmul: c too small");
    assert!(a.len() >= m * k, "matmul: a too small");
    assert!(b.len() >= k * n, "matmul: b too small");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c[..m * n].fill(0.0);
        }
        return;
    }
    let ab = Strides::of(trans, m, k, n);
    let path = Path::of(path_rows, k, n, ab);
    // Row blocks on multiples of the 4-row tile (so that no block ends in slow 1-row tiles),
    // each at least half the parallel threshold: every kernel computes a row of `c` the same
    // way in any block, so the split never changes the results.
    let flops = m * n * k;
    let blocks = if flops >= PARALLEL_MIN_FLOPS {
        threads
            .min(m / 4)
            .min(flops / (PARALLEL_MIN_FLOPS / 2))
            .max(1)
    } else {
        1
    };
    if blocks > 1 {
        let tiles = m / 4;
        let rows = |i: usize| {
            let t = super::part(tiles, blocks, i);
            let end = if i + 1 == blocks { m } else { t.end * 4 };
            t.start * 4..end
        };
        let cs = super::Disjoint::new(&mut c[..m * n]);
        super::par_for(threads, blocks, |i| {
            let r = rows(i);
            // SAFETY: the row blocks are disjoint.
            let cb = unsafe { cs.range(r.start * n..r.end * n) };
            block(
                cb,
                &a[r.start * ab.a_rs..],
                b,
                r.len(),
                k,
                n,
                ab,
                accumulate,
                path,
            );
        });
    } else {
        block(c, a, b, m, k, n, ab, accumulate, path);
    }
}

/// Which kernel a product runs on, chosen from the whole product's shape (never a block's),
/// so that splitting it over threads keeps each element's arithmetic.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// `small_gemm`: ours, register tiles, allocation-free.
    Small,
    /// `dot_gemm`: dot products of contiguous rows (`Trans::B`).
    Dot,
    /// The `gemm` crate (large products).
    Gemm,
}

impl Path {
    fn of(m: usize, k: usize, n: usize, s: Strides) -> Path {
        if m * n * k <= SMALL_MAX_FLOPS && s.b_cs == 1 {
            Path::Small
        } else if s.a_cs == 1 && s.b_rs == 1 {
            Path::Dot
        } else {
            Path::Gemm
        }
    }
}

#[derive(Clone, Copy)]
struct Strides {
    a_rs: usize,
    a_cs: usize,
    b_rs: usize,
    b_cs: usize,
}

impl Strides {
    /// (row stride, column stride) of op(a) and op(b) for an `m x k` by `k x n` product.
    fn of(trans: Trans, m: usize, k: usize, n: usize) -> Strides {
        let (a_rs, a_cs) = match trans {
            Trans::A => (1, m),
            _ => (k, 1),
        };
        let (b_rs, b_cs) = match trans {
            Trans::B => (1, k),
            _ => (n, 1),
        };
        Strides {
            a_rs,
            a_cs,
            b_rs,
            b_cs,
        }
    }
}

/// True when `matmul` (and `matmul_as` with `path_rows = m`) runs an `m x k` by `k x n`
/// product (`trans`) on `small_gemm`: then `small_gemm_rows` gives it the same bits.
pub(crate) fn runs_small(m: usize, k: usize, n: usize, trans: Trans) -> bool {
    Path::of(m, k, n, Strides::of(trans, m, k, n)) == Path::Small
}

/// Products up to this many multiply-adds use `small_gemm` (ours, allocation-free); larger
/// ones the `gemm` crate, which is faster on big matrices but allocates a little per call.
const SMALL_MAX_FLOPS: usize = 1 << 22;

/// One product on `m` rows of op(a), starting at `a[0]`.
#[allow(clippy::too_many_arguments)]
fn block(
    c: &mut [f32],
    a: &[f32],
    b: &[f32],
    m: usize,
    k: usize,
    n: usize,
    s: Strides,
    accumulate: bool,
    path: Path,
) {
    // The last element each operand reaches must lie inside its slice.
    assert!(
        (m - 1) * s.a_rs + (k - 1) * s.a_cs < a.len(),
        "matmul: a too small"
    );
    assert!(
        (k - 1) * s.b_rs + (n - 1) * s.b_cs < b.len(),
        "matmul: b too small"
    );
    assert!(m * n <= c.len(), "matmul: c too small");
    match path {
        Path::Small => {
            small_gemm(c, a, s.a_rs, s.a_cs, b, s.b_rs, m, k, n, accumulate);
            return;
        }
        Path::Dot => {
            // Trans::B: rows of a against rows of b, both contiguous in k.
            dot_gemm(c, a, s.a_rs, b, s.b_cs, m, k, n, accumulate);
            return;
        }
        Path::Gemm => {}
    }
    // SAFETY: the asserts above keep every index gemm touches inside the slices; c does not
    // alias a or b (distinct borrows).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            s.a_cs as isize,
            s.a_rs as isize,
            b.as_ptr(),
            s.b_cs as isize,
            s.b_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `c[r0..r0+R, c0..c0+W] (+)= a[r0..r0+R, :] * b[:, c0..c0+W]` with the R x W block of `c` held
/// in registers while k runs. The caller has checked every index against the slices.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn tile<const R: usize, const W: usize, AR: Rows, BR: Rows>(
    c: &mut [f32],
    a: &[f32],
    a_rs: AR,
    a_cs: usize,
    b: &[f32],
    b_rs: BR,
    k: usize,
    n: usize,
    r0: usize,
    c0: usize,
    accumulate: bool,
) {
    let mut acc = [[0f32; W]; R];
    if accumulate {
        for (r, row) in acc.iter_mut().enumerate() {
            row.copy_from_slice(&c[(r0 + r) * n + c0..][..W]);
        }
    }
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    for p in 0..k {
        // SAFETY: `small_gemm` asserted that rows r0..r0+R of a, and columns c0..c0+W of every
        // row of b, lie inside the slices.
        let bv: [f32; W] =
            unsafe { std::ptr::read_unaligned(bp.add(b_rs.at(p) + c0) as *const [f32; W]) };
        for (r, row) in acc.iter_mut().enumerate() {
            let av = unsafe { *ap.add(a_rs.at(r0 + r) + p * a_cs) };
            for j in 0..W {
                row[j] = av.mul_add(bv[j], row[j]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        c[(r0 + r) * n + c0..][..W].copy_from_slice(row);
    }
}

/// All column tiles of the rows `r0..r0+R`: `WIDE` wide (16, or 32 under AVX-512, see
/// `small_gemm`), then one 16-wide tile if `WIDE` is 32, then one 8-wide tile. When `c` is
/// overwritten (not accumulated) the last tile may overlap the one before it: the overlapped
/// columns are recomputed with the same operations in the same order, so they get the same
/// values, and no slow scalar tail remains.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn row_tiles<const R: usize, const WIDE: usize, AR: Rows, BR: Rows>(
    c: &mut [f32],
    a: &[f32],
    a_rs: AR,
    a_cs: usize,
    b: &[f32],
    b_rs: BR,
    k: usize,
    n: usize,
    r0: usize,
    accumulate: bool,
) {
    let mut c0 = 0;
    while c0 + WIDE <= n {
        tile::<R, WIDE, AR, BR>(c, a, a_rs, a_cs, b, b_rs, k, n, r0, c0, accumulate);
        c0 += WIDE;
    }
    if WIDE > 16 && c0 + 16 <= n {
        tile::<R, 16, AR, BR>(c, a, a_rs, a_cs, b, b_rs, k, n, r0, c0, accumulate);
        c0 += 16;
    }
    if c0 < n && n >= 8 && (!accumulate || c0 + 8 <= n) {
        let start = c0.min(n - 8);
        tile::<R, 8, AR, BR>(c, a, a_rs, a_cs, b, b_rs, k, n, r0, start, accumulate);
        c0 = start + 8;
    }
    while c0 < n {
        tile::<R, 1, AR, BR>(c, a, a_rs, a_cs, b, b_rs, k, n, r0, c0, accumulate);
        c0 += 1;
    }
}

/// Where each row of an operand of `small_gemm` starts: a fixed stride, or a table (rows that
/// are overlapping windows of one buffer, as the convolutions' shifted copies of their input).
pub(crate) trait Rows: Copy {
    /// The offset of row `i`.
    fn at(self, i: usize) -> usize;
    /// The largest offset of rows `0..rows` (`rows > 0`): for the bounds checks.
    fn last(self, rows: usize) -> usize;
}

/// Row `i` at `i * stride`.
#[derive(Clone, Copy)]
pub(crate) struct Stride(pub usize);

impl Rows for Stride {
    #[inline(always)]
    fn at(self, i: usize) -> usize {
        i * self.0
    }
    fn last(self, rows: usize) -> usize {
        (rows - 1) * self.0
    }
}

/// Row `i` at `table[i]`.
#[derive(Clone, Copy)]
pub(crate) struct Table<'a>(pub &'a [usize]);

impl Rows for Table<'_> {
    #[inline(always)]
    fn at(self, i: usize) -> usize {
        self.0[i]
    }
    fn last(self, rows: usize) -> usize {
        self.0[..rows].iter().copied().max().unwrap_or(0)
    }
}

/// `c (m x n) = [c +] a * b` as `small_gemm` (the same operations for every element, so the
/// same bits as the product of the rows copied out into a matrix), with the rows of `a` or `b`
/// where the given `Rows` say; `a`'s columns are contiguous. For the convolutions, whose
/// lowered input would repeat each value 9 times: their rows are windows of 3 shifted copies.
#[allow(clippy::too_many_arguments)]
pub(crate) fn small_gemm_rows<AR: Rows, BR: Rows>(
    c: &mut [f32],
    a: &[f32],
    a_rs: AR,
    b: &[f32],
    b_rs: BR,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use super::simd::Level;
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx512<AR: Rows, BR: Rows>(
            c: &mut [f32],
            a: &[f32],
            a_rs: AR,
            b: &[f32],
            b_rs: BR,
            m: usize,
            k: usize,
            n: usize,
            accumulate: bool,
        ) {
            small_gemm_tiled::<32, AR, BR>(c, a, a_rs, 1, b, b_rs, m, k, n, accumulate)
        }
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2<AR: Rows, BR: Rows>(
            c: &mut [f32],
            a: &[f32],
            a_rs: AR,
            b: &[f32],
            b_rs: BR,
            m: usize,
            k: usize,
            n: usize,
            accumulate: bool,
        ) {
            small_gemm_tiled::<16, AR, BR>(c, a, a_rs, 1, b, b_rs, m, k, n, accumulate)
        }
        match super::simd::level() {
            // SAFETY: `simd::level` returns a level only when the CPU has its features.
            Level::Avx512 => return unsafe { avx512(c, a, a_rs, b, b_rs, m, k, n, accumulate) },
            // SAFETY: as above.
            Level::Avx2 => return unsafe { avx2(c, a, a_rs, b, b_rs, m, k, n, accumulate) },
            Level::Baseline => {}
        }
    }
    small_gemm_tiled::<16, AR, BR>(c, a, a_rs, 1, b, b_rs, m, k, n, accumulate)
}

/// `small_gemm` with tiles `WIDE` columns wide.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn small_gemm_tiled<const WIDE: usize, AR: Rows, BR: Rows>(
    c: &mut [f32],
    a: &[f32],
    a_rs: AR,
    a_cs: usize,
    b: &[f32],
    b_rs: BR,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    assert!(
        a_rs.last(m) + (k - 1) * a_cs < a.len(),
        "small_gemm: a too small"
    );
    assert!(b_rs.last(k) + n <= b.len(), "small_gemm: b too small");
    assert!(m * n <= c.len(), "small_gemm: c too small");
    let mut r0 = 0;
    // SAFETY: the asserts above bound every index the tiles read.
    unsafe {
        while WIDE > 16 && r0 + 8 <= m {
            row_tiles::<8, WIDE, AR, BR>(c, a, a_rs, a_cs, b, b_rs, k, n, r0, accumulate);
            r0 += 8;
        }
        while r0 + 4 <= m {
            row_tiles::<4, WIDE, AR, BR>(c, a, a_rs, a_cs, b, b_rs, k, n, r0, accumulate);
            r0 += 4;
        }
        if r0 + 2 <= m {
            row_tiles::<2, WIDE, AR, BR>(c, a, a_rs, a_cs, b, b_rs, k, n, r0, accumulate);
            r0 += 2;
        }
        if r0 < m {
            row_tiles::<1, WIDE, AR, BR>(c, a, a_rs, a_cs, b, b_rs, k, n, r0, accumulate);
        }
    }
}

/// `c (m x n) = [c +] a * b` for small matrices, register-tiled (4 rows x 16 columns of `c` at
/// a time: eight accumulator registers, enough to hide the FMA latency; under AVX-512, with 32
/// registers, 8 x 32, which loads each row of `b`'s panel once for 8 rows of `c` instead of 4:
/// 8-10% faster on the 7x7 and 14x14 layers, the same elsewhere); `a` has strides (`a_rs`, `a_cs`), `b` is row-major with row stride `b_rs`.
/// Allocates nothing. Each element of `c` is one fused multiply-add chain over k in order,
/// whatever the tiling and the SIMD level (on CPUs without FMA, `mul_add` is a correctly
/// rounded library call: slower, same values).
#[allow(clippy::too_many_arguments)]
fn small_gemm(
    c: &mut [f32],
    a: &[f32],
    a_rs: usize,
    a_cs: usize,
    b: &[f32],
    b_rs: usize,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    #[cfg(target_arch = "x86_64")]
    if super::simd::level() == super::simd::Level::Avx512 {
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx512(
            c: &mut [f32],
            a: &[f32],
            a_rs: usize,
            a_cs: usize,
            b: &[f32],
            b_rs: usize,
            m: usize,
            k: usize,
            n: usize,
            accumulate: bool,
        ) {
            small_gemm_tiled::<32, Stride, Stride>(
                c,
                a,
                Stride(a_rs),
                a_cs,
                b,
                Stride(b_rs),
                m,
                k,
                n,
                accumulate,
            )
        }
        // SAFETY: `simd::level` returns `Avx512` only when the CPU has these features.
        return unsafe { avx512(c, a, a_rs, a_cs, b, b_rs, m, k, n, accumulate) };
    }
    small_gemm16(c, a, a_rs, a_cs, b, b_rs, m, k, n, accumulate)
}

crate::simd_kernel! {
    /// `small_gemm` with 16-wide tiles, at the AVX2 and baseline levels.
    fn small_gemm16(
        c: &mut [f32],
        a: &[f32],
        a_rs: usize,
        a_cs: usize,
        b: &[f32],
        b_rs: usize,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) {
        small_gemm_tiled::<16, Stride, Stride>(
            c,
            a,
            Stride(a_rs),
            a_cs,
            b,
            Stride(b_rs),
            m,
            k,
            n,
            accumulate,
        )
    }
}

/// Vector width of `dot_gemm`'s accumulators.
const DOT_W: usize = 8;

/// `c[r0..r0+R, c0..c0+C] (+)= a[r0.., :] . b[c0.., :]` (rows of a against rows of b), each
/// element a sum over `DOT_W` lanes of k, the lanes added in a fixed order, then the tail: the
/// same operations for an element wherever its block lies.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn dot_tile<const R: usize, const C: usize>(
    c: &mut [f32],
    a: &[f32],
    a_rs: usize,
    b: &[f32],
    b_rs: usize,
    k: usize,
    n: usize,
    r0: usize,
    c0: usize,
    accumulate: bool,
) {
    let mut acc = [[[0f32; DOT_W]; C]; R];
    let kk = k / DOT_W * DOT_W;
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let mut p = 0;
    while p < kk {
        // SAFETY: `dot_gemm` asserted that rows r0..r0+R of a and c0..c0+C of b, each k long,
        // lie inside the slices.
        let av: [[f32; DOT_W]; R] = std::array::from_fn(|r| unsafe {
            std::ptr::read_unaligned(ap.add((r0 + r) * a_rs + p) as *const [f32; DOT_W])
        });
        for j in 0..C {
            let bv: [f32; DOT_W] = unsafe {
                std::ptr::read_unaligned(bp.add((c0 + j) * b_rs + p) as *const [f32; DOT_W])
            };
            for r in 0..R {
                for l in 0..DOT_W {
                    acc[r][j][l] = av[r][l].mul_add(bv[l], acc[r][j][l]);
                }
            }
        }
        p += DOT_W;
    }
    for r in 0..R {
        for j in 0..C {
            let l = &acc[r][j];
            let mut s = ((l[0] + l[4]) + (l[1] + l[5])) + ((l[2] + l[6]) + (l[3] + l[7]));
            for q in kk..k {
                s = unsafe { *ap.add((r0 + r) * a_rs + q) }
                    .mul_add(unsafe { *bp.add((c0 + j) * b_rs + q) }, s);
            }
            let o = &mut c[(r0 + r) * n + c0 + j];
            *o = if accumulate { *o + s } else { s };
        }
    }
}

crate::simd_kernel! {
    /// `c (m x n) = [c +] a * b^T` with `a` `[m, k]` (row stride `a_rs`) and `b` `[n, k]` (row
    /// stride `b_rs`): dot products of rows, for long k. Blocks of 2 x 4 elements, so each
    /// loaded vector serves several products. Allocates nothing.
    fn dot_gemm(
        c: &mut [f32],
        a: &[f32],
        a_rs: usize,
        b: &[f32],
        b_rs: usize,
        m: usize,
        k: usize,
        n: usize,
        accumulate: bool,
    ) {
        if m == 0 || n == 0 || k == 0 {
            return;
        }
        assert!((m - 1) * a_rs + k <= a.len(), "dot_gemm: a too small");
        assert!((n - 1) * b_rs + k <= b.len(), "dot_gemm: b too small");
        assert!(m * n <= c.len(), "dot_gemm: c too small");
        // SAFETY: the asserts above bound every index the tiles read.
        unsafe {
            let mut r0 = 0;
            while r0 < m {
                let two = r0 + 2 <= m;
                let mut c0 = 0;
                while c0 + 4 <= n {
                    if two {
                        dot_tile::<2, 4>(c, a, a_rs, b, b_rs, k, n, r0, c0, accumulate);
                    } else {
                        dot_tile::<1, 4>(c, a, a_rs, b, b_rs, k, n, r0, c0, accumulate);
                    }
                    c0 += 4;
                }
                while c0 < n {
                    if two {
                        dot_tile::<2, 1>(c, a, a_rs, b, b_rs, k, n, r0, c0, accumulate);
                    } else {
                        dot_tile::<1, 1>(c, a, a_rs, b, b_rs, k, n, r0, c0, accumulate);
                    }
                    c0 += 1;
                }
                r0 += if two { 2 } else { 1 };
            }
        }
    }
}

/// The slow twin: the same product in f64, for tests.
pub mod reference {
    use super::Trans;

    /// `C (+)= op(A) op(B)` as the fast kernel, in f64 (`m x k` times `k x n`).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul(
        c: &mut [f64],
        a: &[f64],
        b: &[f64],
        m: usize,
        k: usize,
        n: usize,
        trans: Trans,
        accumulate: bool,
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0;
                for p in 0..k {
                    let av = if trans == Trans::A {
                        a[p * m + i]
                    } else {
                        a[i * k + p]
                    };
                    let bv = if trans == Trans::B {
                        b[j * k + p]
                    } else {
                        b[p * n + j]
                    };
                    s += av * bv;
                }
                c[i * n + j] = if accumulate { c[i * n + j] + s } else { s };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_and_large_products_match_the_f64_twin() {
        let mut seed = 1u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f64 / (1u64 << 31) as f64) - 0.5
        };
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 7),
            (60, 100, 100),
            (100, 60, 10),
            (13, 17, 33),
            (300, 200, 150),
        ] {
            // Under Miri (CI checks the unsafe tiles for undefined behaviour) the small shapes
            // cover every tile and remainder path; the large ones would take hours.
            if cfg!(miri) && m * k * n > 20_000 {
                continue;
            }
            for trans in [Trans::No, Trans::A, Trans::B] {
                for accumulate in [false, true] {
                    let a: Vec<f64> = (0..m * k).map(|_| rnd()).collect();
                    let b: Vec<f64> = (0..k * n).map(|_| rnd()).collect();
                    let c0: Vec<f64> = (0..m * n).map(|_| rnd()).collect();
                    let mut want = c0.clone();
                    reference::matmul(&mut want, &a, &b, m, k, n, trans, accumulate);
                    let a32: Vec<f32> = a.iter().map(|&v| v as f32).collect();
                    let b32: Vec<f32> = b.iter().map(|&v| v as f32).collect();
                    for threads in [1, 2] {
                        let mut c: Vec<f32> = c0.iter().map(|&v| v as f32).collect();
                        matmul(&mut c, &a32, &b32, m, k, n, trans, accumulate, threads);
                        for (g, w) in c.iter().zip(&want) {
                            assert!(
                                (*g as f64 - w).abs() < 1e-5 * (1.0 + k as f64),
                                "{m}x{k}x{n} {trans:?} acc={accumulate}: {g} vs {w}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every path (ours, the dot products, the `gemm` crate for large products) gives the same
    /// Rows given by a table (overlapping windows of one buffer, either operand) give the bits
    /// of `matmul` on the matrix those rows make, overwriting and accumulating, with tiles of
    /// every width (n from 1 to 70) and row tiles of 4, 2 and 1.
    #[test]
    fn row_tables_give_the_bits_of_the_copied_matrix() {
        let mut seed = 11u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let sizes: &[(usize, usize, usize)] = if cfg!(miri) {
            &[(7, 5, 37), (3, 4, 9)]
        } else {
            &[(7, 5, 37), (3, 4, 9), (16, 27, 70), (5, 9, 1), (33, 18, 64)]
        };
        for &(m, k, n) in sizes {
            let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
            // b's rows as windows of a buffer: row p starts at 3 p (overlapping when n > 3).
            let bbuf: Vec<f32> = (0..3 * k + n).map(|_| rnd()).collect();
            let boff: Vec<usize> = (0..k).map(|p| 3 * p).collect();
            let bmat: Vec<f32> = boff.iter().flat_map(|&o| bbuf[o..o + n].to_vec()).collect();
            // a's rows as windows: row r starts at 2 r.
            let abuf: Vec<f32> = (0..2 * m + k).map(|_| rnd()).collect();
            let aoff: Vec<usize> = (0..m).map(|r| 2 * r).collect();
            let amat: Vec<f32> = aoff.iter().flat_map(|&o| abuf[o..o + k].to_vec()).collect();
            for accumulate in [false, true] {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let mut want = c0.clone();
                matmul(&mut want, &a, &bmat, m, k, n, Trans::No, accumulate, 1);
                let mut got = c0.clone();
                small_gemm_rows(
                    &mut got,
                    &a,
                    Stride(k),
                    &bbuf,
                    Table(&boff),
                    m,
                    k,
                    n,
                    accumulate,
                );
                assert_eq!(bits(&got), bits(&want), "b table {m}x{k}x{n} {accumulate}");
                let mut want = c0.clone();
                matmul(&mut want, &amat, &b, m, k, n, Trans::No, accumulate, 1);
                let mut got = c0.clone();
                small_gemm_rows(
                    &mut got,
                    &abuf,
                    Table(&aoff),
                    &b,
                    Stride(n),
                    m,
                    k,
                    n,
                    accumulate,
                );
                assert_eq!(bits(&got), bits(&want), "a table {m}x{k}x{n} {accumulate}");
            }
        }
    }

    /// bits on 1, 2, 3, 5 and 8 threads: a row block computes its rows as the whole product
    /// does.
    #[test]
    fn any_thread_count_gives_the_same_bits() {
        if cfg!(miri) {
            return;
        }
        let mut seed = 7u64;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        for &(m, k, n) in &[
            (64, 576, 196),
            (61, 784, 100),
            (300, 200, 150),
            (37, 1000, 9),
        ] {
            for trans in [Trans::No, Trans::A, Trans::B] {
                let a: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
                let b: Vec<f32> = (0..k * n).map(|_| rnd()).collect();
                let c0: Vec<f32> = (0..m * n).map(|_| rnd()).collect();
                let path = Path::of(m, k, n, Strides::of(trans, m, k, n));
                let mut one = c0.clone();
                matmul(&mut one, &a, &b, m, k, n, trans, true, 1);
                for threads in [2, 3, 5, 8] {
                    let mut c = c0.clone();
                    matmul(&mut c, &a, &b, m, k, n, trans, true, threads);
                    assert!(
                        c.iter().zip(&one).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "{m}x{k}x{n} {trans:?} ({path:?}) on {threads} threads"
                    );
                }
            }
        }
    }
}
