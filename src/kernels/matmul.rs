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
/// two halves computed on the two threads of `team::join`.
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
    // (row stride, column stride) of op(a) and op(b).
    let (a_rs, a_cs) = match trans {
        Trans::A => (1, m),
        _ => (k, 1),
    };
    let (b_rs, b_cs) = match trans {
        Trans::B => (1, k),
        _ => (n, 1),
    };
    let ab = Strides {
        a_rs,
        a_cs,
        b_rs,
        b_cs,
    };
    if threads > 1 && m >= 2 && m * n * k >= PARALLEL_MIN_FLOPS {
        let h = m / 2;
        let (c_top, c_bottom) = c[..m * n].split_at_mut(h * n);
        let a_bottom = &a[h * a_rs..];
        super::join(
            threads,
            || block(c_top, a, b, h, k, n, ab, accumulate),
            || block(c_bottom, a_bottom, b, m - h, k, n, ab, accumulate),
        );
    } else {
        block(c, a, b, m, k, n, ab, accumulate);
    }
}

#[derive(Clone, Copy)]
struct Strides {
    a_rs: usize,
    a_cs: usize,
    b_rs: usize,
    b_cs: usize,
}

/// One gemm call on `m` rows of op(a), starting at `a[0]`.
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

/// The slow twin: the same product in f64, for tests.
pub mod reference {
    use super::Trans;

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
