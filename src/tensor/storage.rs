//! The bytes behind a tensor: typed vectors on the CPU, a device buffer on a GPU.

use crate::device::GpuBuffer;
use crate::dtype::{DType, Element};
use half::{bf16, f16};

pub enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    U8(Vec<u8>),
}

pub enum Storage {
    Cpu(CpuStorage),
    Gpu(GpuBuffer),
}

/// Runs `$body` with `$v` bound to the typed vector inside a `CpuStorage` and `$T` to its
/// element type.
macro_rules! with_cpu_storage {
    ($s:expr, $v:ident, $T:ident => $body:expr) => {
        match $s {
            $crate::tensor::CpuStorage::F32($v) => {
                type $T = f32;
                $body
            }
            $crate::tensor::CpuStorage::F16($v) => {
                type $T = half::f16;
                $body
            }
            $crate::tensor::CpuStorage::BF16($v) => {
                type $T = half::bf16;
                $body
            }
            $crate::tensor::CpuStorage::I32($v) => {
                type $T = i32;
                $body
            }
            $crate::tensor::CpuStorage::I64($v) => {
                type $T = i64;
                $body
            }
            $crate::tensor::CpuStorage::U8($v) => {
                type $T = u8;
                $body
            }
        }
    };
}
pub(crate) use with_cpu_storage;

/// Like `with_cpu_storage!` for the three float types only; `$other` runs for integer storage.
macro_rules! with_cpu_float_storage {
    ($s:expr, $v:ident, $T:ident => $body:expr, _ => $other:expr) => {
        match $s {
            $crate::tensor::CpuStorage::F32($v) => {
                type $T = f32;
                $body
            }
            $crate::tensor::CpuStorage::F16($v) => {
                type $T = half::f16;
                $body
            }
            $crate::tensor::CpuStorage::BF16($v) => {
                type $T = half::bf16;
                $body
            }
            _ => $other,
        }
    };
}
pub(crate) use with_cpu_float_storage;

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        with_cpu_storage!(self, _v, T => T::DTYPE)
    }

    pub fn len(&self) -> usize {
        with_cpu_storage!(self, v, _T => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn as_bytes(&self) -> &[u8] {
        with_cpu_storage!(self, v, _T => bytemuck::cast_slice(v))
    }

    /// Storage of `dtype` from little-endian bytes (any alignment).
    pub fn from_bytes(dtype: DType, bytes: &[u8]) -> CpuStorage {
        fn typed<T: Element>(bytes: &[u8]) -> Vec<T> {
            let mut v = vec![T::zeroed(); bytes.len() / std::mem::size_of::<T>()];
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
            v
        }
        match dtype {
            DType::F32 => CpuStorage::F32(typed(bytes)),
            DType::F16 => CpuStorage::F16(typed(bytes)),
            DType::BF16 => CpuStorage::BF16(typed(bytes)),
            DType::I32 => CpuStorage::I32(typed(bytes)),
            DType::I64 => CpuStorage::I64(typed(bytes)),
            DType::U8 => CpuStorage::U8(typed(bytes)),
        }
    }
}

/// Moves a typed vector into storage.
pub trait IntoCpuStorage: Element {
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    fn slice(s: &CpuStorage) -> Option<&[Self]>;
}

macro_rules! into_storage {
    ($t:ty, $variant:ident) => {
        impl IntoCpuStorage for $t {
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn slice(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
into_storage!(f32, F32);
into_storage!(f16, F16);
into_storage!(bf16, BF16);
into_storage!(i32, I32);
into_storage!(i64, I64);
into_storage!(u8, U8);
