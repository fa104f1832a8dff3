//! `Flatten`: PyTorch's `nn.Flatten()` (`start_dim=1`) on NCHW feature maps, `[C, H, W]` per
//! example in, `[C*H*W]` out. The data of an example is already one contiguous run in that
//! order, so the forward pass copies `x` to `y` and the backward pass copies `dy` to `dx`; the
//! layer exists for the shapes (export, describe), not for the numbers.

use super::conv::{checked_product, shape_error};
use super::{check_forward, Ctx, Layer};
use crate::{Error, Result};

/// `[C, H, W]` per example in, `[C*H*W]` out (see the module doc).
pub struct Flatten {
    /// Channels of the maps flattened.
    pub c: usize,
    /// Height of the maps.
    pub h: usize,
    /// Width of the maps.
    pub w: usize,
}

impl Flatten {
    /// `channels` maps of `h x w`; an error (`Error::Shape`) if any is 0 or their product
    /// overflows.
    pub fn new(channels: usize, h: usize, w: usize) -> Result<Self> {
        let what = format!("Flatten on {channels}x{h}x{w}");
        if channels == 0 || h == 0 || w == 0 {
            return Err(Error::Shape(format!("{what}: a map of size 0")));
        }
        checked_product(&[channels, h, w], "input").map_err(|e| shape_error(&what, "", e))?;
        Ok(Flatten { c: channels, h, w })
    }
}

impl Layer for Flatten {
    fn in_size(&self) -> usize {
        self.c * self.h * self.w
    }
    fn out_size(&self) -> usize {
        self.in_size()
    }
    fn reserve(&mut self, _max_batch: usize) {}

    fn forward(&mut self, _ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        check_forward(self, x, y, n)?;
        let len = n * self.in_size();
        y[..len].copy_from_slice(&x[..len]);
        Ok(())
    }

    fn backward(
        &mut self,
        _ctx: Ctx,
        _x: &[f32],
        _y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        if let Some(dx) = dx {
            let len = n * self.in_size();
            dx[..len].copy_from_slice(&dy[..len]);
        }
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        format!(
            "Flatten(start_dim=1, end_dim=-1) on {}x{}x{}",
            self.c, self.h, self.w
        )
    }
}
