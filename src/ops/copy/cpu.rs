use crate::dtype::{DType, Element};
use crate::layout::{coalesce, Layout};
use crate::ops::cpu::{parallel_fill, walk};
use crate::tensor::{with_cpu_storage, CpuStorage, IntoCpuStorage};

fn filled<T: IntoCpuStorage>(n: usize, value: f64) -> CpuStorage {
    T::into_storage(vec![T::from_f64(value); n])
}

pub fn full(n: usize, value: f64, dtype: DType) -> CpuStorage {
    match dtype {
        DType::F32 => filled::<f32>(n, value),
        DType::F16 => filled::<half::f16>(n, value),
        DType::BF16 => filled::<half::bf16>(n, value),
        DType::I32 => filled::<i32>(n, value),
        DType::I64 => filled::<i64>(n, value),
        DType::U8 => filled::<u8>(n, value),
    }
}

/// Writes the elements of `src` seen through `src_layout` into `dst` seen through `dst_layout`.
pub fn copy_view(src: &CpuStorage, src_layout: &Layout, dst: &mut CpuStorage, dst_layout: &Layout) {
    with_cpu_storage!(dst, d, T => {
        let s = T::slice(src).expect("copy_view between storages of one dtype");
        let (shape, strides) = coalesce(src_layout.shape(), [src_layout.strides(), dst_layout.strides()]);
        let base = [src_layout.offset(), dst_layout.offset()];
        walk(&shape, &strides, base, 0, src_layout.numel(), |_, [i, j]| d[j] = s[i]);
    })
}

pub fn gather(s: &CpuStorage, layout: &Layout) -> CpuStorage {
    with_cpu_storage!(s, v, T => {
        let mut out = vec![<T as bytemuck::Zeroable>::zeroed(); layout.numel()];
        let (shape, strides) = coalesce(layout.shape(), [layout.strides()]);
        parallel_fill(&mut out, |start, chunk| {
            walk(&shape, &strides, [layout.offset()], start, chunk.len(), |k, [i]| chunk[k] = v[i]);
        });
        T::into_storage(out)
    })
}

/// Same rules as the cast kernels: floats through f32 with round to nearest even (the `half`
/// crate rounds that way), float to integer truncates, integer to integer wraps.
fn convert<S: Element, D: IntoCpuStorage>(v: &[S]) -> CpuStorage {
    let out: Vec<D> = if S::DTYPE.is_float() || D::DTYPE.is_float() {
        v.iter().map(|&x| D::from_f32(x.to_f32())).collect()
    } else {
        v.iter().map(|&x| D::wrap_from_i64(x.to_i64())).collect()
    };
    D::into_storage(out)
}

pub fn cast(s: &CpuStorage, dtype: DType) -> CpuStorage {
    with_cpu_storage!(s, v, S => match dtype {
        DType::F32 => convert::<S, f32>(v),
        DType::F16 => convert::<S, half::f16>(v),
        DType::BF16 => convert::<S, half::bf16>(v),
        DType::I32 => convert::<S, i32>(v),
        DType::I64 => convert::<S, i64>(v),
        DType::U8 => convert::<S, u8>(v),
    })
}
