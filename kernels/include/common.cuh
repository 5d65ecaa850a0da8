// The one header every kernel includes. The same source builds for the real GPU with NVRTC
// (inline PTX, device.cuh) and for the virtual GPU with the host compiler (fibers, emu.cuh).
// Kernels include nothing else: no CUDA toolkit headers, no standard headers.
#pragma once

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)
#include "device.cuh"
#elif defined(CUDA_EMU)
#include "emu.cuh"
#else
#error "common.cuh: build with NVRTC, or with -DCUDA_EMU for the virtual GPU"
#endif

#include "half.cuh"

// Hopper's wgmma and async-proxy fence exist where NVRTC compiles for sm_90a, and on the virtual
// GPU, which emulates them. Kernels using them are compiled only where this is defined.
#if defined(CUDA_EMU) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define HAS_WGMMA 1
#endif

#define FULL_MASK 0xffffffffu

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}
__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}

// NaN-propagating max and min, as torch.max and torch.min do: NaN wins over any number.
__device__ __forceinline__ float nan_max(float a, float b) { return (a != a || a > b) ? a : b; }
__device__ __forceinline__ float nan_min(float a, float b) { return (a != a || a < b) ? a : b; }

// CUtensorMap: 128 opaque bytes that describe a global tensor for the tensor memory accelerator,
// encoded by the host (the driver's cuTensorMapEncodeTiled, or the virtual GPU's own encoding) and
// passed by value as a __grid_constant__ kernel parameter.
struct __align__(64) TensorMap {
  unsigned long long words[16];
};

// A strided view of up to 8 dimensions, passed to kernels by value (mirrors `StridedDesc` in
// src/ops/mod.rs). Strides are in elements.
#define MAX_DIMS 8
struct Strided {
  long long rank;
  long long shape[MAX_DIMS];
  long long strides[MAX_DIMS];
};
EMU_ABI_LAYOUT(Strided, rank, shape, strides);

// Storage offsets, in each of the views (same shape, own strides), of the element at row-major
// position `i`. `I` is the index type: 32-bit division is several times cheaper than 64-bit, so
// kernels use unsigned when the element count allows. The loop is unrolled over MAX_DIMS with a
// rank guard so the descriptors are read with constant indices (no local-memory copy of the
// parameters), and the outermost dimension needs no division: what is left of `i` is its index.
template <class I, int N>
__device__ __forceinline__ void strided_offsets(const Strided (&views)[N], I i, long long (&off)[N]) {
  const int rank = int(views[0].rank);
#pragma unroll
  for (int j = 0; j < N; ++j) off[j] = 0;
#pragma unroll
  for (int k = MAX_DIMS - 1; k >= 1; --k) {
    if (k < rank) {
      const I s = I(views[0].shape[k]);
      const I q = i / s;
      const long long r = (long long)(i - q * s);
#pragma unroll
      for (int j = 0; j < N; ++j) off[j] += r * views[j].strides[k];
      i = q;
    }
  }
#pragma unroll
  for (int j = 0; j < N; ++j) off[j] += (long long)i * views[j].strides[0];
}

// First index and stride of a grid-stride loop over a 1-D launch.
#define GRID_STRIDE_LOOP(i, n)                                                         \
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
       i += (long long)gridDim.x * blockDim.x)
