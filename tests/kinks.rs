//! PyTorch's conventions where a derivative is a convention rather than rounding: ReLU's
//! derivative is 0 at exactly 0 (either sign of zero), and a max-pool window whose maximum is
//! tied sends the whole gradient to the first maximum in row-major order.

mod common;

use bnlab::nn::{Layer, MaxPool2d, Mode, Relu};

#[test]
fn relu_derivative_is_zero_at_exactly_zero() {
    let x = [
        -1.0f32,
        -0.0,
        0.0,
        f32::MIN_POSITIVE,
        2.0,
        -f32::MIN_POSITIVE,
    ];
    let mut relu = Relu::new(x.len());
    relu.reserve(1);
    let mut y = vec![9.0; x.len()];
    relu.forward(common::ctx(Mode::Train), &x, &mut y, 1)
        .unwrap();
    assert_eq!(y, [0.0, 0.0, 0.0, f32::MIN_POSITIVE, 2.0, 0.0]);
    let dy = [1.0f32; 6];
    let mut dx = vec![9.0; x.len()];
    relu.backward(common::ctx(Mode::Train), &x, &y, &dy, Some(&mut dx), 1);
    assert_eq!(dx, [0.0, 0.0, 0.0, 1.0, 1.0, 0.0], "PyTorch: relu'(0) = 0");
}

#[test]
fn max_pool_ties_go_to_the_first_maximum_in_row_major_order() {
    // One 4x4 map, 2x2 windows with stride 2: four windows with different ties.
    #[rustfmt::skip]
    let x = [
        1.0f32, 1.0,   0.0, 3.0,
        1.0,    1.0,   3.0, 3.0,
        -2.0,  -1.0,   5.0, 4.0,
        -1.0,  -3.0,   4.0, 5.0,
    ];
    for threads in [1, 2] {
        let mut pool = MaxPool2d::new(1, 2, 2, 0, 4, 4).unwrap();
        pool.reserve(2);
        // Two examples, the second the first's copy, so both batch halves are exercised.
        let xs: Vec<f32> = x.iter().chain(x.iter()).copied().collect();
        let mut y = vec![0.0; 8];
        let ctx = bnlab::nn::Ctx {
            mode: Mode::Train,
            threads,
        };
        pool.forward(ctx, &xs, &mut y, 2).unwrap();
        assert_eq!(&y[..4], &[1.0, 3.0, -1.0, 5.0]);
        let dy = [1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0];
        let mut dx = vec![9.0; 32];
        pool.backward(ctx, &xs, &y, &dy, Some(&mut dx), 2);
        #[rustfmt::skip]
        let want = [
            1.0f32, 0.0,   0.0, 2.0,
            0.0,    0.0,   0.0, 0.0,
            0.0,    3.0,   4.0, 0.0,
            0.0,    0.0,   0.0, 0.0,
        ];
        assert_eq!(&dx[..16], &want, "threads {threads}");
        assert_eq!(&dx[16..], &want, "threads {threads}");
    }
}
