//! One error type for the engine. Every message names what was wrong (shape, dtype, device,
//! file, kernel) so a user can act on it without a backtrace.

use std::fmt;

#[derive(Debug)]
pub enum Error {
    /// Shapes that do not fit an operation; the message names every shape involved.
    Shape(String),
    /// A dtype that an operation does not support, or dtypes that do not match.
    DType(String),
    /// An unknown device string, an unavailable device, or tensors on different devices.
    Device(String),
    /// A CUDA driver or NVRTC failure.
    Cuda(String),
    /// A kernel on the virtual GPU broke a CUDA rule (race, deadlock, bad address ...).
    Vgpu { kernel: String, message: String },
    /// An invalid argument other than a shape or dtype.
    Argument(String),
    /// A file could not be read or written.
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A file was read but its contents are wrong.
    Format { path: String, message: String },
}

pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Shape(m) => write!(f, "shape error: {m}"),
            Error::DType(m) => write!(f, "dtype error: {m}"),
            Error::Device(m) => write!(f, "device error: {m}"),
            Error::Cuda(m) => write!(f, "CUDA error: {m}"),
            Error::Vgpu { kernel, message } => write!(f, "virtual GPU: kernel {kernel}: {message}"),
            Error::Argument(m) => write!(f, "invalid argument: {m}"),
            Error::Io { path, source } => write!(f, "{path}: {source}"),
            Error::Format { path, message } => write!(f, "{path}: {message}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Shorthand for `Err(Error::Shape(format!(...)))`.
macro_rules! shape_err {
    ($($t:tt)*) => { Err($crate::error::Error::Shape(format!($($t)*))) };
}
/// Shorthand for `Err(Error::DType(format!(...)))`.
macro_rules! dtype_err {
    ($($t:tt)*) => { Err($crate::error::Error::DType(format!($($t)*))) };
}
pub(crate) use dtype_err;
pub(crate) use shape_err;
