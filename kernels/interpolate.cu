// Bicubic interpolation of a channels-last [N, H, W, C] tensor to [N, OH, OW, C], PyTorch's
// F.interpolate(mode="bicubic", align_corners=False) semantics, f32 weights and sums, output in
// the input's dtype. A thread per output element; each computes its separable weights itself.
//
// Along an axis, `step` is the source distance between outputs: 1 / scale_factor when the caller
// gave a scale factor (PyTorch uses the given factor, not in / out), else in / out. Source
// coordinates are computed in f64, from the step in f64: PyTorch's f32 path rounds the step to f32,
// which moves DINOv2's 37 -> 16 outputs by up to ~1e-5 from the exact values; with f64 coordinates
// and f32 weights and sums they stay within ~3e-6.
//
//   interpolate_bicubic_*:    output index d samples source coordinate s = step * (d + 0.5) - 0.5;
//                             i = floor(s) (at most in - 1), t = s - i (clamped to [0, 1]); the four
//                             neighbours i - 1 .. i + 2, clamped to the border, are weighted by
//                             Keys' cubic convolution with a = -0.75 (t + 1, t, 1 - t, 2 - t).
//   interpolate_bicubic_aa_*: PyTorch's antialiased bicubic (aten's _upsample_bicubic2d_aa, Pillow's
//                             resampling): centre c = step * (d + 0.5); when downsampling (step >= 1)
//                             the cubic (a = -0.5 here, as Pillow) is widened by step (support
//                             2 * step, arguments divided by step), else support 2; the window
//                             [int(c - support + 0.5), int(c + support + 0.5)) is cut to the input,
//                             never clamped, and its weights are divided by their sum. An axis whose
//                             size does not change gets step 1 from the host: the identity, as
//                             PyTorch skips such an axis.
//   interpolate_bicubic_backward_*: a thread per input element gathers the output gradients that
//                             read it (both modes; the host passes each axis's transposed taps).
#include "common.cuh"

// Mirrors `InterpShape` in src/ops/interpolate/gpu.rs.
struct InterpShape {
  long long n, h, w, c, oh, ow;
  double step_h, step_w;
};
EMU_ABI_LAYOUT(InterpShape, n, h, w, c, oh, ow, step_h, step_w);

__device__ __forceinline__ float cubic_near(float x, float a) { return ((a + 2.f) * x - (a + 3.f)) * x * x + 1.f; }
__device__ __forceinline__ float cubic_far(float x, float a) { return ((a * x - 5.f * a) * x + 8.f * a) * x - 4.f * a; }

__device__ __forceinline__ long long clamp_index(long long i, long long len) {
  return i < 0 ? 0 : (i >= len ? len - 1 : i);
}

// The first of the four neighbours of output index d and their weights.
__device__ __forceinline__ long long cubic_taps(long long d, double step, long long len, float (&wt)[4]) {
  const double s = step * ((double)d + 0.5) - 0.5;
  long long i = (long long)floor(s);
  if (i > len - 1) i = len - 1;
  float t = (float)(s - (double)i);
  t = t < 0.f ? 0.f : (t > 1.f ? 1.f : t);
  const float a = -0.75f;
  wt[0] = cubic_far(t + 1.f, a);
  wt[1] = cubic_near(t, a);
  wt[2] = cubic_near(1.f - t, a);
  wt[3] = cubic_far(2.f - t, a);
  return i - 1;
}

template <class T>
__device__ void interpolate_bicubic(const T* __restrict__ x, T* __restrict__ y, InterpShape s) {
  GRID_STRIDE_LOOP(e, s.n * s.oh * s.ow * s.c) {
    const long long c = e % s.c, ox = (e / s.c) % s.ow, oy = (e / (s.c * s.ow)) % s.oh, n = e / (s.c * s.ow * s.oh);
    float wy[4], wx[4];
    const long long y0 = cubic_taps(oy, s.step_h, s.h, wy), x0 = cubic_taps(ox, s.step_w, s.w, wx);
    const T* img = x + n * s.h * s.w * s.c + c;
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const T* row = img + clamp_index(y0 + j, s.h) * s.w * s.c;
      float r = 0.f;
#pragma unroll
      for (int k = 0; k < 4; ++k) r += wx[k] * to_f32(row[clamp_index(x0 + k, s.w) * s.c]);
      acc += wy[j] * r;
    }
    y[e] = from_f32<T>(acc);
  }
}

// Pillow's bicubic filter (a = -0.5), zero beyond 2.
__device__ __forceinline__ float aa_filter(float x) {
  x = fabsf(x);
  if (x < 1.f) return cubic_near(x, -0.5f);
  if (x < 2.f) return cubic_far(x, -0.5f);
  return 0.f;
}

// The window of output index d along an axis: first index, length, the filter's centre and
// argument scale, and the sum of its weights (each weight is aa_filter(...) / total).
struct AaWindow {
  long long first, len;
  double center;
  float inv_scale, total;
};

__device__ __forceinline__ float aa_filter_at(const AaWindow& a, long long j) {
  return aa_filter((float)((double)(j + a.first) - a.center + 0.5) * a.inv_scale);
}

// The j-th weight of the window, normalised as PyTorch does (left alone when they sum to 0).
__device__ __forceinline__ float aa_weight(const AaWindow& a, long long j) {
  const float f = aa_filter_at(a, j);
  return a.total != 0.f ? f / a.total : f;
}

__device__ __forceinline__ AaWindow aa_window(long long d, double step, long long len) {
  AaWindow a;
  const double support = step >= 1.0 ? 2.0 * step : 2.0;
  a.center = step * ((double)d + 0.5);
  a.inv_scale = step >= 1.0 ? (float)(1.0 / step) : 1.f;
  long long lo = (long long)(a.center - support + 0.5), hi = (long long)(a.center + support + 0.5);
  lo = lo < 0 ? 0 : lo;
  hi = hi > len ? len : hi;
  // PyTorch's bound on the window (rounding can make it one longer)
  const long long most = (long long)ceil(support) * 2 + 1;
  long long n = hi - lo;
  n = n < 0 ? 0 : (n > most ? most : n);
  a.first = lo;
  a.len = n;
  a.total = 0.f;
  for (long long j = 0; j < n; ++j) a.total += aa_filter_at(a, j);
  return a;
}

template <class T>
__device__ void interpolate_bicubic_aa(const T* __restrict__ x, T* __restrict__ y, InterpShape s) {
  GRID_STRIDE_LOOP(e, s.n * s.oh * s.ow * s.c) {
    const long long c = e % s.c, ox = (e / s.c) % s.ow, oy = (e / (s.c * s.ow)) % s.oh, n = e / (s.c * s.ow * s.oh);
    const AaWindow ay = aa_window(oy, s.step_h, s.h), ax = aa_window(ox, s.step_w, s.w);
    const T* img = x + n * s.h * s.w * s.c + c;
    float acc = 0.f;
    for (long long j = 0; j < ay.len; ++j) {
      const T* row = img + (ay.first + j) * s.w * s.c;
      float r = 0.f;
      for (long long k = 0; k < ax.len; ++k) r += aa_weight(ax, k) * to_f32(row[(ax.first + k) * s.c]);
      acc += aa_weight(ay, j) * r;
    }
    y[e] = from_f32<T>(acc);
  }
}

// The input's gradient: a thread per input element gathers the output gradients that read it,
// through the transposed taps of each axis (computed on the host in f64, the weights rounded to
// f32): for input position i, entries first[i] .. first[i + 1] - 1 name an output position and
// its weight. No atomics: a fixed summation order.
template <class T>
__device__ void interpolate_bicubic_backward(const T* __restrict__ dy, T* __restrict__ dx, InterpShape s,
                                             const int* __restrict__ row_first, const int* __restrict__ row_index,
                                             const float* __restrict__ row_weight, const int* __restrict__ col_first,
                                             const int* __restrict__ col_index, const float* __restrict__ col_weight) {
  GRID_STRIDE_LOOP(e, s.n * s.h * s.w * s.c) {
    const long long c = e % s.c, ix = (e / s.c) % s.w, iy = (e / (s.c * s.w)) % s.h, n = e / (s.c * s.w * s.h);
    const T* img = dy + n * s.oh * s.ow * s.c + c;
    float acc = 0.f;
    for (int a = row_first[iy]; a < row_first[iy + 1]; ++a) {
      const T* row = img + (long long)row_index[a] * s.ow * s.c;
      float r = 0.f;
      for (int b = col_first[ix]; b < col_first[ix + 1]; ++b) r += col_weight[b] * to_f32(row[(long long)col_index[b] * s.c]);
      acc += row_weight[a] * r;
    }
    dx[e] = from_f32<T>(acc);
  }
}

#define INTERPOLATE_KERNELS(dt, T)                                                                      \
  extern "C" __global__ void interpolate_bicubic_##dt(const T* x, T* y, InterpShape s) {               \
    interpolate_bicubic<T>(x, y, s);                                                                    \
  }                                                                                                     \
  extern "C" __global__ void interpolate_bicubic_aa_##dt(const T* x, T* y, InterpShape s) {            \
    interpolate_bicubic_aa<T>(x, y, s);                                                                 \
  }                                                                                                     \
  extern "C" __global__ void interpolate_bicubic_backward_##dt(                                         \
      const T* dy, T* dx, InterpShape s, const int* row_first, const int* row_index, const float* row_weight, \
      const int* col_first, const int* col_index, const float* col_weight) {                            \
    interpolate_bicubic_backward<T>(dy, dx, s, row_first, row_index, row_weight, col_first, col_index,  \
                                    col_weight);                                                        \
  }
INTERPOLATE_KERNELS(f32, float)
INTERPOLATE_KERNELS(f16, f16)
INTERPOLATE_KERNELS(bf16, bf16)
