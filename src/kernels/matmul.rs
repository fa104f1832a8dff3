//! Matrix multiply on row-major f32 slices, wrapping the `gemm` crate (faer's kernels).
//!
//! Parallelism is an explicit argument: small products stay on one thread, because fork-join
//! costs more than it gives on the 100x100 matrices of the paper's MLP.

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
const PARALLEL_MIN_FLOPS: usize = 1 << 21;

/// `c (m x n) = [c +] op(a) * op(b)`, all row-major. `accumulate` adds to `c` instead of
/// overwriting it. `threads` is the most threads the product may use.
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
    // (row stride, column stride) of op(a) and op(b) as seen by gemm.
    let (a_rs, a_cs) = match trans {
        Trans::A => (1isize, m as isize),
        _ => (k as isize, 1isize),
    };
    let (b_rs, b_cs) = match trans {
        Trans::B => (1isize, k as isize),
        _ => (n as isize, 1isize),
    };
    let par = if threads > 1 && m * n * k >= PARALLEL_MIN_FLOPS {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above guarantee every index gemm touches lies inside the slices;
    // c does not alias a or b (distinct borrows).
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
            a_cs,
            a_rs,
            b.as_ptr(),
            b_cs,
            b_rs,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
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
