// 2-D max pooling, channels-last ([N, H, W, C] -> [N, OH, OW, C]), PyTorch's MaxPool2d semantics:
// floor mode, dilation 1, padding that never wins (as if -inf). Values are compared in f32, which
// holds every f16/bf16 value exactly, so the result is exact in every dtype.
//
//   max_pool_*:          a thread per output element; writes the value and the index ih * W + iw
//                        (i32) of the input element it took: the first largest in (kh, kw) order,
//                        or the last NaN, as PyTorch's CPU kernel picks it.
//   max_pool_backward_*: a thread per input element gathers the output gradients of every window
//                        that covers it and picked it (windows overlap when stride < kernel), in
//                        (oh, ow) order: no atomics, a fixed summation order, f32 sums.
#include "common.cuh"

// Mirrors `PoolShape` in src/ops/pool/gpu.rs.
struct PoolShape {
  long long n, h, w, c, kernel, stride, pad, oh, ow;
};
EMU_ABI_LAYOUT(PoolShape, n, h, w, c, kernel, stride, pad, oh, ow);

template <class T>
__device__ void max_pool(const T* __restrict__ x, T* __restrict__ y, int* __restrict__ idx, PoolShape s) {
  GRID_STRIDE_LOOP(e, s.n * s.oh * s.ow * s.c) {
    const long long c = e % s.c, ow = (e / s.c) % s.ow, oh = (e / (s.c * s.ow)) % s.oh, n = e / (s.c * s.ow * s.oh);
    const long long h0 = oh * s.stride - s.pad, w0 = ow * s.stride - s.pad;
    const long long h_lo = h0 < 0 ? 0 : h0, w_lo = w0 < 0 ? 0 : w0;
    const long long h_hi = min(h0 + s.kernel, s.h), w_hi = min(w0 + s.kernel, s.w);
    float best = to_f32(x[((n * s.h + h_lo) * s.w + w_lo) * s.c + c]);
    long long at = h_lo * s.w + w_lo;
    for (long long ih = h_lo; ih < h_hi; ++ih) {
      for (long long iw = w_lo; iw < w_hi; ++iw) {
        const float v = to_f32(x[((n * s.h + ih) * s.w + iw) * s.c + c]);
        if (v > best || v != v) {
          best = v;
          at = ih * s.w + iw;
        }
      }
    }
    y[e] = from_f32<T>(best);
    idx[e] = (int)at;
  }
}

// The first output position along an axis whose window (start o * stride - pad, length kernel)
// covers input position i.
__device__ __forceinline__ long long pool_first_window(long long i, long long kernel, long long stride,
                                                       long long pad) {
  const long long a = i + pad - kernel + 1;
  return a <= 0 ? 0 : (a + stride - 1) / stride;
}

template <class T>
__device__ void max_pool_backward(const int* __restrict__ idx, const T* __restrict__ dy, T* __restrict__ dx,
                                  PoolShape s) {
  GRID_STRIDE_LOOP(e, s.n * s.h * s.w * s.c) {
    const long long c = e % s.c, iw = (e / s.c) % s.w, ih = (e / (s.c * s.w)) % s.h, n = e / (s.c * s.w * s.h);
    const long long me = ih * s.w + iw;
    const long long oh_hi = min((ih + s.pad) / s.stride + 1, s.oh), ow_hi = min((iw + s.pad) / s.stride + 1, s.ow);
    float sum = 0.f;
    for (long long oh = pool_first_window(ih, s.kernel, s.stride, s.pad); oh < oh_hi; ++oh) {
      for (long long ow = pool_first_window(iw, s.kernel, s.stride, s.pad); ow < ow_hi; ++ow) {
        const long long o = ((n * s.oh + oh) * s.ow + ow) * s.c + c;
        if (idx[o] == me) sum += to_f32(dy[o]);
      }
    }
    dx[e] = from_f32<T>(sum);
  }
}

#define POOL_KERNELS(name, T)                                                                           \
  extern "C" __global__ void max_pool_##name(const T* x, T* y, int* idx, PoolShape s) {                \
    max_pool(x, y, idx, s);                                                                             \
  }                                                                                                     \
  extern "C" __global__ void max_pool_backward_##name(const int* idx, const T* dy, T* dx, PoolShape s) { \
    max_pool_backward(idx, dy, dx, s);                                                                  \
  }
POOL_KERNELS(f32, float)
POOL_KERNELS(f16, f16)
POOL_KERNELS(bf16, bf16)
