//! The paper's studies as functions that train their variants and collect results for `report`.

pub mod ics;
pub mod inception;
pub mod mnist;
pub mod normalizers;
pub mod precise_bn;
