//! `Tensor`: a layout (shape, strides, offset) over shared storage on a device. Tensors are
//! immutable values: ops return new tensors, and views share storage without copying.

mod random;
mod storage;

pub use random::Rng;
pub(crate) use storage::{with_cpu_float_storage, with_cpu_storage};
pub use storage::{CpuStorage, IntoCpuStorage, Storage};

use crate::device::Device;
use crate::dtype::DType;
use crate::error::{shape_err, Error, Result};
use crate::layout::{resolve_dim, Layout};
use crate::tape::record;
use std::fmt;
use std::sync::Arc;

/// A tensor value. Cloning is cheap and keeps the identity (`id`) the autograd tape knows it by;
/// every op, views included, returns a tensor with a new identity.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    layout: Layout,
    dtype: DType,
    device: Device,
    id: u64,
    requires_grad: bool,
}

impl Tensor {
    /// A tensor over `storage` with `layout`; the layout must stay inside the storage.
    pub(crate) fn from_parts(
        storage: Storage,
        layout: Layout,
        dtype: DType,
        device: Device,
    ) -> Tensor {
        Tensor {
            storage: Arc::new(storage),
            layout,
            dtype,
            device,
            id: crate::tape::next_id(),
            requires_grad: false,
        }
    }

    /// A new view of the same storage (not recorded: the view ops record themselves).
    pub(crate) fn with_layout(&self, layout: Layout) -> Tensor {
        Tensor {
            storage: self.storage.clone(),
            layout,
            dtype: self.dtype,
            device: self.device.clone(),
            id: crate::tape::next_id(),
            requires_grad: false,
        }
    }

    /// The identity under which autograd tracks this tensor.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether gradients flow to this tensor.
    pub fn is_requires_grad(&self) -> bool {
        self.requires_grad
    }

    /// This tensor as a leaf that gradients flow to (see `autograd::backward`).
    pub fn requires_grad(mut self) -> Tensor {
        self.requires_grad = true;
        self
    }

    /// The same values, cut off from the graph.
    pub fn detach(&self) -> Tensor {
        Tensor {
            id: crate::tape::next_id(),
            requires_grad: false,
            ..self.clone()
        }
    }

    pub(crate) fn with_identity(mut self, id: u64, requires_grad: bool) -> Tensor {
        self.id = id;
        self.requires_grad = requires_grad;
        self
    }

    /// The values of a dense f32 CPU tensor that nobody else shares, for updating in place.
    pub(crate) fn f32_slice_mut(&mut self) -> Option<&mut [f32]> {
        let n = self.numel();
        if self.layout.offset() != 0 || !self.layout.is_contiguous() {
            return None;
        }
        match Arc::get_mut(&mut self.storage)? {
            Storage::Cpu(CpuStorage::F32(v)) if v.len() == n => Some(v),
            _ => None,
        }
    }

    /// Mutable storage of a tensor nobody else shares (one just made by an op).
    pub(crate) fn storage_mut(&mut self) -> Option<&mut Storage> {
        Arc::get_mut(&mut self.storage)
    }

    pub fn from_vec<T: IntoCpuStorage>(
        data: Vec<T>,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return shape_err!(
                "from_vec: {} values do not fill shape {shape:?} ({n} elements)",
                data.len()
            );
        }
        let t = Tensor::from_parts(
            Storage::Cpu(T::into_storage(data)),
            Layout::contiguous(shape)?,
            T::DTYPE,
            Device::Cpu,
        );
        t.to_device(device)
    }

    /// The f32 values that `fill` writes, as a tensor of `shape` on `device`. On a GPU `fill`
    /// writes into page-locked host memory that the device copies from directly
    /// (`Gpu::upload_staged`): a large input such as a batch of images reaches the device with no
    /// further host copy. `fill` gets zeros.
    pub fn from_f32_fill(
        shape: &[usize],
        device: &Device,
        fill: impl FnOnce(&mut [f32]),
    ) -> Result<Tensor> {
        let layout = Layout::contiguous(shape)?;
        let n: usize = shape.iter().product();
        match device {
            Device::Cpu => {
                let mut data = vec![0f32; n];
                fill(&mut data);
                Tensor::from_vec(data, shape, device)
            }
            Device::Gpu(g) => {
                let buf = g.upload_staged(n * 4, |bytes| fill(bytemuck::cast_slice_mut(bytes)))?;
                Ok(Tensor::from_parts(
                    Storage::Gpu(buf),
                    layout,
                    DType::F32,
                    device.clone(),
                ))
            }
        }
    }

    pub fn from_slice<T: IntoCpuStorage>(
        data: &[T],
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        Tensor::from_vec(data.to_vec(), shape, device)
    }

    /// f64 values converted to `dtype` (rounded to nearest for floats, truncated for integers).
    pub fn from_f64(
        data: &[f64],
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        use half::{bf16, f16};
        match dtype {
            DType::F32 => Tensor::from_vec(data.iter().map(|&x| x as f32).collect(), shape, device),
            DType::F16 => Tensor::from_vec(
                data.iter().map(|&x| f16::from_f64(x)).collect(),
                shape,
                device,
            ),
            DType::BF16 => Tensor::from_vec(
                data.iter().map(|&x| bf16::from_f64(x)).collect(),
                shape,
                device,
            ),
            DType::I32 => Tensor::from_vec(data.iter().map(|&x| x as i32).collect(), shape, device),
            DType::I64 => Tensor::from_vec(data.iter().map(|&x| x as i64).collect(), shape, device),
            DType::U8 => Tensor::from_vec(data.iter().map(|&x| x as u8).collect(), shape, device),
        }
    }

    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(shape, 0.0, dtype, device)
    }

    pub fn ones(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Tensor::full(shape, 1.0, dtype, device)
    }

    /// Uniform values in `[low, high)` from a seeded generator; the same on every device.
    pub fn rand_uniform(
        shape: &[usize],
        low: f64,
        high: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut rng = Rng::new(seed);
        let n = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| low + (high - low) * rng.uniform()).collect();
        Tensor::from_f64(&data, shape, dtype, device)
    }

    /// Normal values with the given mean and standard deviation from a seeded generator.
    pub fn randn(
        shape: &[usize],
        mean: f64,
        std: f64,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let mut rng = Rng::new(seed);
        let n = shape.iter().product();
        let data: Vec<f64> = (0..n).map(|_| mean + std * rng.normal()).collect();
        Tensor::from_f64(&data, shape, dtype, device)
    }

    pub fn shape(&self) -> &[usize] {
        self.layout.shape()
    }
    pub fn rank(&self) -> usize {
        self.layout.rank()
    }
    pub fn numel(&self) -> usize {
        self.layout.numel()
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn layout(&self) -> &Layout {
        &self.layout
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn is_contiguous(&self) -> bool {
        self.layout.is_contiguous()
    }

    /// Size of dimension `dim` (negative counts from the end).
    pub fn dim(&self, dim: isize) -> Result<usize> {
        Ok(self.shape()[resolve_dim(dim, self.rank(), "dim")?])
    }

    // ---------------------------------------------------------------- views

    /// A view with another shape of the same number of elements; copies first when the layout
    /// cannot be viewed that way (as torch.reshape does). One dimension may be `usize::MAX` to
    /// mean "whatever is left".
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        let mut shape = shape.to_vec();
        if let Some(i) = shape.iter().position(|&d| d == usize::MAX) {
            let known: usize = shape
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, &d)| d)
                .product();
            if known == 0 || self.numel() % known != 0 {
                return shape_err!("cannot reshape {:?} to {shape:?}", self.shape());
            }
            shape[i] = self.numel() / known;
        }
        let src = if self.is_contiguous() {
            self.clone()
        } else {
            self.contiguous()?
        };
        let out = src.with_layout(src.layout.reshape(&shape)?);
        let in_shape = self.shape().to_vec();
        Ok(record(out, &[&src], move |g, _| {
            Ok(vec![Some(g.reshape(&in_shape)?)])
        }))
    }

    pub fn permute(&self, dims: &[usize]) -> Result<Tensor> {
        let out = self.with_layout(self.layout.permute(dims)?);
        let mut inverse = vec![0; dims.len()];
        for (i, &d) in dims.iter().enumerate() {
            inverse[d] = i;
        }
        Ok(record(out, &[self], move |g, _| {
            Ok(vec![Some(g.permute(&inverse)?)])
        }))
    }

    pub fn transpose(&self, a: isize, b: isize) -> Result<Tensor> {
        let (a, b) = (
            resolve_dim(a, self.rank(), "transpose")?,
            resolve_dim(b, self.rank(), "transpose")?,
        );
        let out = self.with_layout(self.layout.transpose(a, b)?);
        let (a, b) = (a as isize, b as isize);
        Ok(record(out, &[self], move |g, _| {
            Ok(vec![Some(g.transpose(a, b)?)])
        }))
    }

    /// Transpose of the last two dimensions.
    pub fn t(&self) -> Result<Tensor> {
        if self.rank() < 2 {
            return shape_err!(
                "t() needs at least 2 dimensions, got shape {:?}",
                self.shape()
            );
        }
        self.transpose(-2, -1)
    }

    /// Elements `start..start + len` along `dim`.
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        let d = resolve_dim(dim, self.rank(), "narrow")?;
        let out = self.with_layout(self.layout.narrow(d, start, len)?);
        let in_shape = self.shape().to_vec();
        Ok(record(out, &[self], move |g, _| {
            Ok(vec![Some(g.narrow_scatter(&in_shape, d, start)?)])
        }))
    }

    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Tensor> {
        let out = self.with_layout(self.layout.broadcast_to(shape)?);
        let in_shape = self.shape().to_vec();
        Ok(record(out, &[self], move |g, _| {
            Ok(vec![Some(g.sum_to_shape(&in_shape)?)])
        }))
    }

    /// Inserts a dimension of size 1 at `dim` (0..=rank).
    pub fn unsqueeze(&self, dim: usize) -> Result<Tensor> {
        if dim > self.rank() {
            return shape_err!(
                "unsqueeze({dim}) is out of range for shape {:?}",
                self.shape()
            );
        }
        let mut shape = self.shape().to_vec();
        shape.insert(dim, 1);
        self.reshape(&shape)
    }

    /// Removes dimension `dim`, which must have size 1.
    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        let d = resolve_dim(dim, self.rank(), "squeeze")?;
        if self.shape()[d] != 1 {
            return shape_err!(
                "squeeze({dim}): dimension of size {} in shape {:?} is not 1",
                self.shape()[d],
                self.shape()
            );
        }
        let mut shape = self.shape().to_vec();
        shape.remove(d);
        self.reshape(&shape)
    }

    // ---------------------------------------------------------------- reading back

    /// The elements in row-major order; `T` must be the tensor's dtype.
    pub fn to_vec<T: IntoCpuStorage>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType(format!(
                "to_vec::<{}>() on a {} tensor",
                T::DTYPE,
                self.dtype
            )));
        }
        let cpu = self.to_device(&Device::Cpu)?.contiguous()?;
        let Storage::Cpu(s) = cpu.storage() else {
            unreachable!("to_device(cpu) gives CPU storage")
        };
        let v = T::slice(s).expect("dtype checked above");
        let off = cpu.layout.offset();
        Ok(v[off..off + cpu.numel()].to_vec())
    }

    /// The elements as f64, whatever the dtype (for tests and printing).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        let cpu = self.to_device(&Device::Cpu)?;
        let Storage::Cpu(s) = cpu.storage() else {
            unreachable!("to_device(cpu) gives CPU storage")
        };
        Ok(with_cpu_storage!(s, v, _T => {
            cpu.layout.storage_indices().map(|i| crate::dtype::Element::to_f64(v[i])).collect()
        }))
    }

    /// The only element of a one-element tensor.
    pub fn to_scalar_f64(&self) -> Result<f64> {
        if self.numel() != 1 {
            return shape_err!(
                "to_scalar_f64 needs one element, shape is {:?}",
                self.shape()
            );
        }
        Ok(self.to_f64_vec()?[0])
    }

    /// Errors unless `other` is on the same device.
    pub(crate) fn same_device(&self, other: &Tensor, op: &str) -> Result<()> {
        if !self.device.same(&other.device) {
            return Err(Error::Device(format!(
                "{op}: tensors on {} and {}",
                self.device, other.device
            )));
        }
        Ok(())
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {})",
            self.shape(),
            self.dtype,
            self.device
        )
    }
}
