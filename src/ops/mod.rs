//! Operations, one folder per family: `mod.rs` has the API and the shape and dtype checks,
//! `cpu.rs` the CPU implementation (also the reference the GPU kernels are tested against),
//! `gpu.rs` the launches of the kernels in `kernels/<family>.cu`.

pub mod attention;
pub mod augment;
pub mod conv;
pub mod copy;
pub(crate) mod cpu;
pub mod elementwise;
pub mod interpolate;
pub mod knn;
pub mod loss;
pub mod matmul;
pub mod mnn;
pub mod norm;
pub mod pool;
pub mod reduce;
pub mod softmax;

use crate::layout::{Layout, MAX_DIMS};

/// Mirrors `struct Strided` in kernels/include/common.cuh (layout tested in src/device/abi.rs).
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub struct StridedDesc {
    pub(crate) rank: i64,
    pub(crate) shape: [i64; MAX_DIMS],
    pub(crate) strides: [i64; MAX_DIMS],
}

impl StridedDesc {
    /// The view's shape and strides. Its offset is not included: pass the kernel the base
    /// pointer advanced by `layout.offset()` elements.
    pub fn new(layout: &Layout) -> Self {
        Self::from_parts(layout.shape(), layout.strides())
    }

    /// A descriptor of `shape` with these strides (e.g. after `layout::coalesce`).
    pub fn from_parts(shape: &[usize], strides: &[usize]) -> Self {
        let mut d = StridedDesc {
            rank: shape.len() as i64,
            shape: [1; MAX_DIMS],
            strides: [0; MAX_DIMS],
        };
        for (i, (&n, &s)) in shape.iter().zip(strides).enumerate() {
            d.shape[i] = n as i64;
            d.strides[i] = s as i64;
        }
        d
    }
}

/// Threads per block of the simple 1-D kernels, and the most blocks they launch (they loop).
pub(crate) const LINEAR_THREADS: u32 = 256;
pub(crate) const LINEAR_MAX_BLOCKS: u32 = 1024;
