//! Sigmoid and ReLU layers. Their backward passes use the saved output only.

use super::{Ctx, Layer};
use crate::kernels::activation as k;
use crate::Result;

pub struct Sigmoid {
    size: usize,
}

impl Sigmoid {
    pub fn new(size: usize) -> Self {
        Sigmoid { size }
    }
}

impl Layer for Sigmoid {
    fn in_size(&self) -> usize {
        self.size
    }
    fn out_size(&self) -> usize {
        self.size
    }
    fn reserve(&mut self, _max_batch: usize) {}
    fn forward(&mut self, _ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        let len = n * self.size;
        k::sigmoid_forward(&x[..len], &mut y[..len]);
        Ok(())
    }
    fn backward(
        &mut self,
        _ctx: Ctx,
        _x: &[f32],
        y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        if let Some(dx) = dx {
            let len = n * self.size;
            k::sigmoid_backward(&y[..len], &dy[..len], &mut dx[..len]);
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        "Sigmoid()".into()
    }
}

pub struct Relu {
    size: usize,
}

impl Relu {
    pub fn new(size: usize) -> Self {
        Relu { size }
    }
}

impl Layer for Relu {
    fn in_size(&self) -> usize {
        self.size
    }
    fn out_size(&self) -> usize {
        self.size
    }
    fn reserve(&mut self, _max_batch: usize) {}
    fn forward(&mut self, _ctx: Ctx, x: &[f32], y: &mut [f32], n: usize) -> Result<()> {
        let len = n * self.size;
        k::relu_forward(&x[..len], &mut y[..len]);
        Ok(())
    }
    fn backward(
        &mut self,
        _ctx: Ctx,
        _x: &[f32],
        y: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
        n: usize,
    ) {
        if let Some(dx) = dx {
            let len = n * self.size;
            k::relu_backward(&y[..len], &dy[..len], &mut dx[..len]);
        }
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
    fn describe(&self) -> String {
        "ReLU()".into()
    }
}
