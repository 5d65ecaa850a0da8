// Layer norm over the last axis of a dense [rows, n] tensor x (f32, f16 or bf16):
//   y = (x - mean) * rstd * weight + bias,   rstd = 1 / sqrt(var + eps),   var biased (divided by n).
// Statistics and arithmetic in f32, y in x's dtype. weight and bias are f32 [n] (the host converts
// them; either may be null: weight 1, bias 0). The row's mean and rstd are written (f32 [rows]) for
// the backward.
//
//   layer_norm_*:                   a group of `width` lanes of a warp per row (width 1..32, rows up
//                                   to 1024), or a block per row (width 0). Two-pass statistics: the
//                                   sum, then the sum of squared deviations from the mean (no
//                                   cancellation when |mean| >> std), then the write: three reads of
//                                   a row, the later ones mostly from L1/L2.
//   layer_norm_backward_*:          dx per row, same work split. With xhat = (x - mean) * rstd and
//                                   g = dy * weight: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
//   layer_norm_param_grad_partial_*: dweight = sum over rows of dy * xhat and dbias = sum of dy,
//                                   stage one: block (column tile, chunk of rows), a thread per
//                                   column, sums its chunk's rows in order into partial[chunk][col].
//   layer_norm_param_grad_sum:      stage two: a thread per column adds the chunks in order. No
//                                   atomics: the same bits on every run.
#include "common.cuh"

// Sum over aligned groups of `width` lanes; every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int width) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    if (o < width) v += __shfl_xor_sync(FULL_MASK, v, o);
  }
  return v;
}

// Every thread of the block gets the block's sum. Every thread must call it.
__device__ float block_sum(float v) {
  EMU_SHARED(float, warp_part, [32]);
  EMU_SHARED(float, total, [1]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  v = group_sum(v, 32);
  __syncthreads();  // the previous readers of `total` are done
  if (lane == 0) warp_part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float w = lane < warps ? warp_part[lane] : 0.f;
    w = group_sum(w, 32);
    if (lane == 0) total[0] = w;
  }
  __syncthreads();
  return total[0];
}

// Sums over a row's group of threads: `width` lanes of a warp, or the whole block when width is 0.
__device__ __forceinline__ float row_reduce(float v, int width) { return width == 0 ? block_sum(v) : group_sum(v, width); }

template <class T>
__device__ __forceinline__ float part_sum(const T* p, long long n, int t, int nt) {
  float a = 0.f;
  for (long long k = t; k < n; k += nt) a += to_f32(p[k]);
  return a;
}

template <class T>
__device__ __forceinline__ float part_sq_dev(const T* p, long long n, int t, int nt, float mean) {
  float a = 0.f;
  for (long long k = t; k < n; k += nt) {
    const float d = to_f32(p[k]) - mean;
    a += d * d;
  }
  return a;
}

// Calls row_fn(row, t, nt, valid) for every row, with the row's thread index t of nt threads. In the
// warp mode a warp takes 32 / width rows at a time; the loop runs over groups of rows so that its
// trip count, and with it the shuffles inside row_fn, is uniform across the warp (invalid rows past
// the end take part in the shuffles only).
template <class F>
__device__ __forceinline__ void for_each_row(long long rows, int width, F row_fn) {
  if (width == 0) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) row_fn(r, (int)threadIdx.x, (int)blockDim.x, true);
    return;
  }
  const int lane = threadIdx.x & 31, t = lane & (width - 1);
  const long long rows_per_warp = 32 / width, warps = blockDim.x >> 5;
  for (long long r0 = (blockIdx.x * warps + (threadIdx.x >> 5)) * rows_per_warp; r0 < rows;
       r0 += gridDim.x * warps * rows_per_warp) {
    const long long r = r0 + lane / width;
    row_fn(r, t, width, r < rows);
  }
}

template <class T>
__device__ void layer_norm(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                           T* __restrict__ y, float* __restrict__ mean_out, float* __restrict__ rstd_out, long long rows,
                           long long n, float eps, int width) {
  for_each_row(rows, width, [&](long long r, int t, int nt, bool valid) {
    const T* xr = x + r * n;
    const float mean = row_reduce(valid ? part_sum(xr, n, t, nt) : 0.f, width) / (float)n;
    const float var = row_reduce(valid ? part_sq_dev(xr, n, t, nt, mean) : 0.f, width) / (float)n;
    const float rstd = 1.f / sqrtf(var + eps);
    if (!valid) return;
    T* yr = y + r * n;
    for (long long k = t; k < n; k += nt) {
      float v = (to_f32(xr[k]) - mean) * rstd;
      if (w) v *= w[k];
      if (b) v += b[k];
      yr[k] = from_f32<T>(v);
    }
    if (t == 0) {
      mean_out[r] = mean;
      rstd_out[r] = rstd;
    }
  });
}

template <class T>
__device__ void layer_norm_backward(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ mean,
                                    const float* __restrict__ rstd, const T* __restrict__ dy, T* __restrict__ dx,
                                    long long rows, long long n, int width) {
  for_each_row(rows, width, [&](long long r, int t, int nt, bool valid) {
    const T* xr = x + r * n;
    const T* gr = dy + r * n;
    const float m = valid ? mean[r] : 0.f, rs = valid ? rstd[r] : 0.f;
    float sum_g = 0.f, sum_gx = 0.f;
    if (valid) {
      for (long long k = t; k < n; k += nt) {
        const float g = to_f32(gr[k]) * (w ? w[k] : 1.f);
        sum_g += g;
        sum_gx += g * (to_f32(xr[k]) - m) * rs;
      }
    }
    const float mean_g = row_reduce(sum_g, width) / (float)n;
    const float mean_gx = row_reduce(sum_gx, width) / (float)n;
    if (!valid) return;
    T* xg = dx + r * n;
    for (long long k = t; k < n; k += nt) {
      const float g = to_f32(gr[k]) * (w ? w[k] : 1.f);
      const float xhat = (to_f32(xr[k]) - m) * rs;
      xg[k] = from_f32<T>(rs * (g - mean_g - xhat * mean_gx));
    }
  });
}

// Block (blockIdx.x: a tile of blockDim.x columns, blockIdx.y: rows [chunk * rows_per_chunk, ..)).
// Either partial buffer may be null (that gradient is not needed).
template <class T>
__device__ void layer_norm_param_grad_partial(const T* __restrict__ x, const float* __restrict__ mean,
                                              const float* __restrict__ rstd, const T* __restrict__ dy,
                                              float* __restrict__ partial_w, float* __restrict__ partial_b,
                                              long long rows, long long n, long long rows_per_chunk) {
  const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  const long long r0 = (long long)blockIdx.y * rows_per_chunk;
  const long long r1 = r0 + rows_per_chunk < rows ? r0 + rows_per_chunk : rows;
  float acc_w = 0.f, acc_b = 0.f;
  for (long long r = r0; r < r1; ++r) {
    const float g = to_f32(dy[r * n + col]);
    acc_b += g;
    if (partial_w) acc_w += g * (to_f32(x[r * n + col]) - mean[r]) * rstd[r];
  }
  const long long o = (long long)blockIdx.y * n + col;
  if (partial_w) partial_w[o] = acc_w;
  if (partial_b) partial_b[o] = acc_b;
}

#define LAYER_NORM_KERNELS(dt, T)                                                                                    \
  extern "C" __global__ void __launch_bounds__(1024, 1)                                                              \
      layer_norm_##dt(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd, long long rows,    \
                      long long n, float eps, int width) {                                                           \
    layer_norm<T>(x, w, b, y, mean, rstd, rows, n, eps, width);                                                      \
  }                                                                                                                  \
  extern "C" __global__ void __launch_bounds__(1024, 1)                                                              \
      layer_norm_backward_##dt(const T* x, const float* w, const float* mean, const float* rstd, const T* dy, T* dx, \
                               long long rows, long long n, int width) {                                             \
    layer_norm_backward<T>(x, w, mean, rstd, dy, dx, rows, n, width);                                                \
  }                                                                                                                  \
  extern "C" __global__ void layer_norm_param_grad_partial_##dt(const T* x, const float* mean, const float* rstd,    \
                                                                const T* dy, float* partial_w, float* partial_b,     \
                                                                long long rows, long long n,                         \
                                                                long long rows_per_chunk) {                          \
    layer_norm_param_grad_partial<T>(x, mean, rstd, dy, partial_w, partial_b, rows, n, rows_per_chunk);             \
  }
LAYER_NORM_KERNELS(f32, float)
LAYER_NORM_KERNELS(f16, f16)
LAYER_NORM_KERNELS(bf16, bf16)

// A thread per column: the sum of `chunks` partial rows (f32 [chunks, n]) in chunk order. Either
// pair of partial and output pointers may be null.
extern "C" __global__ void layer_norm_param_grad_sum(const float* __restrict__ partial_w,
                                                     const float* __restrict__ partial_b, float* __restrict__ dw,
                                                     float* __restrict__ db, long long chunks, long long n) {
  GRID_STRIDE_LOOP(col, n) {
    float acc_w = 0.f, acc_b = 0.f;
    for (long long c = 0; c < chunks; ++c) {
      if (partial_w) acc_w += partial_w[c * n + col];
      if (partial_b) acc_b += partial_b[c * n + col];
    }
    if (dw) dw[col] = acc_w;
    if (db) db[col] = acc_b;
  }
}
