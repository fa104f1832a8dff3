//! Elementwise nonlinearities and the softmax cross-entropy loss.
//!
//! `exp` is a branch-free Cephes-style approximation (within 2 ulp of the exact value on the range
//! used) so that the sigmoid loops vectorize; the standard library's `expf` is a scalar call.

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln(2) split in two so that n * ln2 subtracts exactly.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// 1.5 * 2^23: adding it rounds a float of magnitude below 2^22 to an integer, which then sits
/// in the low mantissa bits (no float-to-int conversion, so the loop vectorizes).
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x for x in about [-87, 88]; inputs beyond are clamped (results stay finite).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * LOG2E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC; // round(x / ln 2), in [-126, 127]
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n: the low bits of t hold n (plus 2^22, shifted out); n + 127 is the biased exponent.
    let scale = f32::from_bits(t.to_bits().wrapping_add(127) << 23);
    e * scale
}

simd_kernel! {
    /// y = 1 / (1 + e^-x)
    pub fn sigmoid_forward(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = 1.0 / (1.0 + exp(-v));
        }
    }
}

simd_kernel! {
    /// dx = dy * y * (1 - y)
    pub fn sigmoid_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((o, &s), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = g * s * (1.0 - s);
        }
    }
}

/// tanh(x), branch-free (so loops vectorize), within a few ulp of the exact value (Cephes'
/// `tanhf`): for |x| < 0.625 an odd polynomial, `x + x^3 P(x^2)`, which keeps the relative
/// accuracy near 0; beyond, `1 - 2 / (e^(2|x|) + 1)` with the sign of x. Saturates to +-1
/// (`exp` clamps its argument); NaN stays NaN.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    let z = x.abs();
    let zz = z * z;
    let mut p = -5.704_988_7e-3f32;
    p = p * zz + 2.063_909e-2;
    p = p * zz - 5.373_971_6e-2;
    p = p * zz + 1.333_144_2e-1;
    p = p * zz - 3.333_328e-1;
    let small = p * zz * z + z;
    // NaN falls through to here, where it stays NaN.
    let big = 1.0 - 2.0 / (exp(2.0 * z) + 1.0);
    let m = if z < 0.625 { small } else { big };
    m.copysign(x)
}

simd_kernel! {
    /// y = tanh(x)
    pub fn tanh_forward(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = tanh(v);
        }
    }
}

simd_kernel! {
    /// dx = dy * (1 - y^2), from the saved output.
    pub fn tanh_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((o, &t), &g) in dx.iter_mut().zip(y).zip(dy) {
            *o = g * (1.0 - t * t);
        }
    }
}

/// ReLU, `y = max(x, 0)` (0 for NaN).
pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        *o = if v > 0.0 { v } else { 0.0 };
    }
}

/// dx = dy where the output was positive (PyTorch's convention: zero gradient at 0).
pub fn relu_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    for ((o, &s), &g) in dx.iter_mut().zip(y).zip(dy) {
        *o = if s > 0.0 { g } else { 0.0 };
    }
}

/// Mean softmax cross-entropy over `n` rows of `k` logits, and its gradient
/// `dlogits = (softmax - onehot) / n`. Stable: subtracts each row's maximum first.
/// Returns the loss in f64.
pub fn softmax_cross_entropy(
    logits: &[f32],
    labels: &[usize],
    n: usize,
    k: usize,
    dlogits: Option<&mut [f32]>,
) -> f64 {
    softmax_cross_entropy_of(logits, labels, n, k, dlogits, n)
}

/// [`softmax_cross_entropy`] of `n` examples that are part of a batch of `batch`: the loss is
/// still the mean over the `n`, while `dlogits` is the gradient of the mean over the whole
/// batch (divided by `batch`), so that the ranks of a data-parallel run, each holding a slice,
/// add up to the single-process gradient.
pub fn softmax_cross_entropy_of(
    logits: &[f32],
    labels: &[usize],
    n: usize,
    k: usize,
    dlogits: Option<&mut [f32]>,
    batch: usize,
) -> f64 {
    let mut total = 0.0f64;
    let mut dl = dlogits;
    for i in 0..n {
        let row = &logits[i * k..][..k];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0.0f64;
        for &v in row {
            z += ((v - mx) as f64).exp();
        }
        let lse = mx as f64 + z.ln();
        total += lse - row[labels[i]] as f64;
        if let Some(d) = dl.as_deref_mut() {
            let dr = &mut d[i * k..][..k];
            let inv_n = 1.0 / batch as f64;
            for (j, (o, &v)) in dr.iter_mut().zip(row).enumerate() {
                let p = ((v as f64 - lse).exp()) * inv_n;
                *o = if j == labels[i] {
                    (p - inv_n) as f32
                } else {
                    p as f32
                };
            }
        }
    }
    total / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_is_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -12.0f32;
        while x < 12.0 {
            let want = (x as f64).tanh();
            let got = tanh(x) as f64;
            let ulp = (want.abs() as f32).max(f32::MIN_POSITIVE);
            let ulp = (f32::from_bits(ulp.to_bits() + 1) - ulp) as f64;
            worst = worst.max((got - want).abs() / ulp);
            x += 1.7e-4;
        }
        assert!(worst <= 4.0, "tanh off by {worst} ulp");
        // Small arguments keep their relative accuracy.
        for x in [1e-30f32, -3e-8, 1e-4, -2.5e-3] {
            assert!((tanh(x) as f64 - (x as f64).tanh()).abs() <= (x.abs() as f64) * 2.4e-7);
        }
        assert_eq!(tanh(0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(tanh(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(tanh(100.0), 1.0);
        assert_eq!(tanh(-f32::INFINITY), -1.0);
        assert!(tanh(f32::NAN).is_nan());
    }

    #[test]
    fn exp_is_within_two_ulp() {
        let mut x = -80.0f32;
        while x < 80.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = (want as f32).abs() * f32::EPSILON;
            assert!(
                (got - want).abs() <= 2.0 * ulp as f64,
                "exp({x}) = {got}, want {want}"
            );
            x += 0.0137;
        }
    }

    #[test]
    fn sigmoid_saturates_without_nan() {
        let x = [-1e30f32, -100.0, 0.0, 100.0, 1e30];
        let mut y = [0f32; 5];
        sigmoid_forward(&x, &mut y);
        assert!(y.iter().all(|v| v.is_finite()));
        assert!(y[0] < 1e-30 && y[4] == 1.0 && y[2] == 0.5);
    }
}
