//! Element types.

use crate::error::{Error, Result};
use half::{bf16, f16};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I32,
    I64,
    U8,
}

impl DType {
    pub const ALL: [DType; 6] = [
        DType::F32,
        DType::F16,
        DType::BF16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];
    pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F16 | DType::BF16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::I64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The suffix of kernel names for this dtype (`unary_f32`, `gemm_bf16` ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::U8 => "u8",
        }
    }

    /// The relative tolerance of results computed in f32 and stored in this dtype.
    pub fn tolerance(self) -> f64 {
        match self {
            DType::F32 => 1e-5,
            DType::F16 => 1e-2,
            DType::BF16 => 2e-2,
            _ => 0.0,
        }
    }

    /// Errors unless this is a floating-point dtype.
    pub fn require_float(self, op: &str) -> Result<()> {
        if self.is_float() {
            Ok(())
        } else {
            Err(Error::DType(format!(
                "{op} needs a float tensor (f32, f16 or bf16), got {self}"
            )))
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        DType::ALL
            .into_iter()
            .find(|d| d.name() == s)
            .ok_or_else(|| {
                Error::Argument(format!(
                    "unknown dtype '{s}' (expected one of f32, f16, bf16, i32, i64, u8)"
                ))
            })
    }
}

/// A Rust type that can be a tensor element. CPU kernels are generic over it and compute in f32
/// (floats) or exactly (integers) through `to_f64`/`from_f64` where a generic path is enough.
pub trait Element: Copy + Send + Sync + 'static + bytemuck::Pod + PartialOrd + fmt::Debug {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    /// Integer value (floats truncate toward zero).
    fn to_i64(self) -> i64;
    /// Two's-complement wrapping conversion, as C++ and PyTorch convert between integer types.
    fn wrap_from_i64(v: i64) -> Self;
}

/// f32 to f16, round to nearest even, NaN to the canonical 0x7fff as the kernels produce it.
pub fn f16_from_f32(v: f32) -> f16 {
    if v.is_nan() {
        f16::from_bits(0x7fff)
    } else {
        f16::from_f32(v)
    }
}

/// f32 to bf16, round to nearest even, NaN to the canonical 0x7fff as the kernels produce it.
pub fn bf16_from_f32(v: f32) -> bf16 {
    if v.is_nan() {
        bf16::from_bits(0x7fff)
    } else {
        bf16::from_f32(v)
    }
}

macro_rules! element {
    ($t:ty, $d:expr, $to32:expr, $from32:expr, $to64:expr, $from64:expr, $toi:expr, $fromi:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn to_f32(self) -> f32 {
                $to32(self)
            }
            fn from_f32(v: f32) -> Self {
                $from32(v)
            }
            fn to_f64(self) -> f64 {
                $to64(self)
            }
            fn from_f64(v: f64) -> Self {
                $from64(v)
            }
            fn to_i64(self) -> i64 {
                $toi(self)
            }
            fn wrap_from_i64(v: i64) -> Self {
                $fromi(v)
            }
        }
    };
}

element!(
    f32,
    DType::F32,
    |x| x,
    |v| v,
    |x: f32| x as f64,
    |v: f64| v as f32,
    |x: f32| x as i64,
    |v: i64| v as f32
);
element!(
    f16,
    DType::F16,
    f16::to_f32,
    f16_from_f32,
    |x: f16| x.to_f64(),
    |v: f64| if v.is_nan() {
        f16::from_bits(0x7fff)
    } else {
        f16::from_f64(v)
    },
    |x: f16| x.to_f32() as i64,
    |v: i64| f16_from_f32(v as f32)
);
element!(
    bf16,
    DType::BF16,
    bf16::to_f32,
    bf16_from_f32,
    |x: bf16| x.to_f64(),
    |v: f64| if v.is_nan() {
        bf16::from_bits(0x7fff)
    } else {
        bf16::from_f64(v)
    },
    |x: bf16| x.to_f32() as i64,
    |v: i64| bf16_from_f32(v as f32)
);
element!(
    i32,
    DType::I32,
    |x: i32| x as f32,
    |v: f32| v as i32,
    |x: i32| x as f64,
    |v: f64| v as i32,
    |x: i32| x as i64,
    |v: i64| v as i32
);
element!(
    i64,
    DType::I64,
    |x: i64| x as f32,
    |v: f32| v as i64,
    |x: i64| x as f64,
    |v: f64| v as i64,
    |x: i64| x,
    |v: i64| v
);
// Float to u8 goes through i32 as the kernels do ((unsigned char)(int)x).
element!(
    u8,
    DType::U8,
    |x: u8| x as f32,
    |v: f32| v as i32 as u8,
    |x: u8| x as f64,
    |v: f64| v as i32 as u8,
    |x: u8| x as i64,
    |v: i64| v as u8
);
