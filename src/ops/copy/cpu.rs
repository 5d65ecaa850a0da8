use crate::dtype::{DType, Element};
use crate::layout::Layout;
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
        for (i, j) in dst_layout.storage_indices().zip(src_layout.storage_indices()) {
            d[i] = s[j];
        }
    })
}

pub fn gather(s: &CpuStorage, layout: &Layout) -> CpuStorage {
    with_cpu_storage!(s, v, T => T::into_storage(gather_rows(v, layout)))
}

/// Elements per thread below which splitting a gather does not pay.
const GATHER_PER_THREAD: usize = 1 << 16;

/// The elements of `v` seen through `layout`, row by row (a row = the last dimension, read with
/// its stride), rows split over threads for large views.
fn gather_rows<T: Copy + Send + Sync>(v: &[T], layout: &Layout) -> Vec<T> {
    let n = layout.numel();
    if n == 0 {
        return Vec::new();
    }
    let (shape, strides) = (layout.shape(), layout.strides());
    let (row_len, step) = match (shape.last(), strides.last()) {
        (Some(&len), Some(&step)) => (len, step),
        _ => (1, 0),
    };
    let outer = &shape[..shape.len().saturating_sub(1)];
    // storage offset of the first element of row `r`
    let row_start = |mut r: usize| {
        let mut off = layout.offset();
        for (d, &size) in outer.iter().enumerate().rev() {
            off += (r % size) * strides[d];
            r /= size;
        }
        off
    };
    let mut out = vec![v[layout.offset()]; n];
    let fill = |first_row: usize, chunk: &mut [T]| {
        for (i, row) in chunk.chunks_mut(row_len).enumerate() {
            let start = row_start(first_row + i);
            for (j, o) in row.iter_mut().enumerate() {
                *o = v[start + j * step];
            }
        }
    };
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let rows = n / row_len;
    let rows_per = rows.div_ceil(cores.min(n / GATHER_PER_THREAD).max(1));
    std::thread::scope(|scope| {
        for (c, chunk) in out.chunks_mut(rows_per * row_len).enumerate() {
            let fill = &fill;
            if (c + 1) * rows_per >= rows {
                fill(c * rows_per, chunk);
            } else {
                scope.spawn(move || fill(c * rows_per, chunk));
            }
        }
    });
    out
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
