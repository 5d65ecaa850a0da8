// softmax and log_softmax over the last axis of a contiguous [rows, n] tensor; f32 math, output in
// the input dtype.
//
//   n <= 1024 -> softmax_warp_* / log_softmax_warp_*: one warp per row (a group of 1-16 lanes per row
//                for rows of up to 64), 8 warps per block.
//   longer    -> softmax_block_* / log_softmax_block_*: one block per row.
//   few rows, very long (too few to fill the GPU a block each)
//             -> the row is cut into chunks, a block each: softmax_split_stats_* writes each chunk's
//                (max, sum) and softmax_split_write_* / log_softmax_split_write_* merge their row's
//                chunks and write their own.
//
// Two reads of the row: the first computes the row max m and s = sum(exp(x - m)) in one pass with
// the online rescaling rule (a new max multiplies the running sum by exp(old - new)), the second
// writes exp(x - m) / s or x - m - log(s). That is one read fewer than max, sum, write; the second
// read of a row mostly hits L2. Loads and stores are 16-byte vectors after a scalar head that
// reaches 16-byte alignment.
//
// Special values follow torch: a NaN anywhere makes the row NaN; -inf elements give 0 (log: -inf);
// a row of only -inf is NaN; +inf makes the row NaN (torch computes inf - inf there).
#include "common.cuh"

#define NEG_INF __uint_as_float(0xff800000u)

// Running max and sum of exp(x - m) over the elements seen so far.
struct Stats {
  float m, s;
};

__device__ __forceinline__ Stats stats_add(Stats a, float x) {
  if (x == NEG_INF) return a;  // contributes exp(-inf) = 0; skipping it avoids exp(-inf - -inf) = NaN
  if (x > a.m) {
    // expf(x - x) is 1, or NaN for x = +inf, as torch's exp(inf - max) is
    a.s = a.s * expf(a.m - x) + expf(x - x);
    a.m = x;
  } else {
    a.s += expf(x - a.m);  // NaN x lands here and makes s NaN
  }
  return a;
}

// Commutative (equal maxima add symmetrically), so the xor butterfly leaves the same bits in every lane.
__device__ __forceinline__ Stats stats_merge(Stats a, Stats b) {
  if (b.m > a.m) {
    const Stats t = a;
    a = b;
    b = t;
  }
  if (b.s == 0.f) return a;  // nothing seen (or only -inf)
  a.s += b.s * expf(b.m - a.m);
  return a;
}

// Merge over aligned groups of `width` lanes (a power of two up to 32); every lane of a group gets
// its group's statistics. Every lane of the warp must call it.
__device__ __forceinline__ Stats warp_stats(Stats a, int width = 32) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    if (o >= width) continue;
    Stats b;
    b.m = __shfl_xor_sync(FULL_MASK, a.m, o);
    b.s = __shfl_xor_sync(FULL_MASK, a.s, o);
    a = stats_merge(a, b);
  }
  return a;
}

// Every thread of the block gets the row's statistics. Every thread must call it.
__device__ Stats block_stats(Stats a) {
  EMU_SHARED(float, warp_m, [32]);
  EMU_SHARED(float, warp_s, [32]);
  EMU_SHARED(float, row_m, [1]);
  EMU_SHARED(float, row_s, [1]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  a = warp_stats(a);
  __syncthreads();  // the previous row's readers are done with the shared values
  if (lane == 0) {
    warp_m[warp] = a.m;
    warp_s[warp] = a.s;
  }
  __syncthreads();
  if (warp == 0) {
    Stats b{NEG_INF, 0.f};
    if (lane < warps) b = Stats{warp_m[lane], warp_s[lane]};
    b = warp_stats(b);
    if (lane == 0) {
      row_m[0] = b.m;
      row_s[0] = b.s;
    }
  }
  __syncthreads();
  return Stats{row_m[0], row_s[0]};
}

template <class T>
union Vec {
  uint4 raw;
  T e[16 / sizeof(T)];
};

// A row is read as a scalar head up to 16-byte alignment (this many elements, at most the row),
// 16-byte vectors, and a scalar tail; thread t of nt takes every nt-th element or vector of each.
template <class T>
__device__ __forceinline__ long long aligned_head(const T* p, long long n) {
  const long long head = (long long)((16 - ((unsigned long long)p & 15)) & 15) / (long long)sizeof(T);
  return head < n ? head : n;
}

template <class T>
__device__ __forceinline__ Stats row_stats(const T* p, long long n, int t, int nt) {
  constexpr int V = 16 / sizeof(T);
  Stats a{NEG_INF, 0.f};
  const long long head = aligned_head(p, n), nvec = (n - head) / V;
  for (long long k = t; k < head; k += nt) a = stats_add(a, to_f32(p[k]));
  const uint4* vp = reinterpret_cast<const uint4*>(p + head);
  for (long long k = t; k < nvec; k += nt) {
    Vec<T> v;
    v.raw = vp[k];
#pragma unroll
    for (int j = 0; j < V; ++j) a = stats_add(a, to_f32(v.e[j]));
  }
  for (long long k = head + nvec * V + t; k < n; k += nt) a = stats_add(a, to_f32(p[k]));
  return a;
}

template <bool LOG>
__device__ __forceinline__ float normalize(float x, float m, float inv_s, float log_s) {
  return LOG ? x - m - log_s : expf(x - m) * inv_s;
}

template <class T, bool LOG>
__device__ __forceinline__ void write_row(const T* p, T* q, long long n, int t, int nt, Stats st) {
  constexpr int V = 16 / sizeof(T);
  const float inv_s = 1.f / st.s, log_s = logf(st.s);
  // vectors need the input and output rows at the same offset from 16-byte alignment, which holds
  // for the dense buffers the host passes; anything else takes the scalar path
  const bool vectors = (((unsigned long long)p ^ (unsigned long long)q) & 15) == 0;
  const long long head = vectors ? aligned_head(p, n) : n, nvec = (n - head) / V;
  for (long long k = t; k < head; k += nt) q[k] = from_f32<T>(normalize<LOG>(to_f32(p[k]), st.m, inv_s, log_s));
  const uint4* vp = reinterpret_cast<const uint4*>(p + head);
  uint4* vq = reinterpret_cast<uint4*>(q + head);
  for (long long k = t; k < nvec; k += nt) {
    Vec<T> v;
    v.raw = vp[k];
#pragma unroll
    for (int j = 0; j < V; ++j) v.e[j] = from_f32<T>(normalize<LOG>(to_f32(v.e[j]), st.m, inv_s, log_s));
    vq[k] = v.raw;
  }
  for (long long k = head + nvec * V + t; k < n; k += nt) q[k] = from_f32<T>(normalize<LOG>(to_f32(p[k]), st.m, inv_s, log_s));
}

// Each warp handles 32 / width rows at a time, `width` lanes per row, so short rows do not leave
// most of a warp idle. The loop runs over groups of rows so that its trip count, and with it the
// shuffles, is uniform across the warp.
template <class T, bool LOG>
__device__ void softmax_warp(const T* in, T* out, long long rows, long long n, int width) {
  const int lane = threadIdx.x & 31, t = lane & (width - 1);
  const long long rows_per_warp = 32 / width, warps = blockDim.x >> 5;
  for (long long r0 = (blockIdx.x * warps + (threadIdx.x >> 5)) * rows_per_warp; r0 < rows;
       r0 += gridDim.x * warps * rows_per_warp) {
    const long long r = r0 + lane / width;
    Stats st{NEG_INF, 0.f};
    if (r < rows) st = row_stats(in + r * n, n, t, width);
    st = warp_stats(st, width);
    if (r < rows) write_row<T, LOG>(in + r * n, out + r * n, n, t, width, st);
  }
}

template <class T, bool LOG>
__device__ void softmax_block(const T* in, T* out, long long rows, long long n) {
  for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
    const Stats st = block_stats(row_stats(in + r * n, n, threadIdx.x, blockDim.x));
    write_row<T, LOG>(in + r * n, out + r * n, n, threadIdx.x, blockDim.x, st);
  }
}

#define SOFTMAX_ENTRIES(name, LOG, dt, T)                                                                         \
  extern "C" __global__ void name##_warp_##dt(const T* in, T* out, long long rows, long long n, int width) {      \
    softmax_warp<T, LOG>(in, out, rows, n, width);                                                                \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(1024) name##_block_##dt(const T* in, T* out, long long rows,       \
                                                                        long long n) {                            \
    softmax_block<T, LOG>(in, out, rows, n);                                                                      \
  }

// Split rows: block b of the grid is chunk b % chunks of row b / chunks, elements [c * chunk, ..)
// (chunk a multiple of 16 elements, so a chunk keeps its row's offset from 16-byte alignment).
struct Chunk {
  long long row, begin, len;
};

__device__ __forceinline__ Chunk chunk_of(long long n, long long chunk, long long chunks) {
  const long long row = blockIdx.x / chunks, begin = (blockIdx.x % chunks) * chunk;
  return Chunk{row, begin, (n - begin < chunk ? n - begin : chunk)};
}

template <class T>
__device__ void softmax_split_stats(const T* in, Stats* partial, long long n, long long chunk, long long chunks) {
  const Chunk c = chunk_of(n, chunk, chunks);
  const Stats st = block_stats(row_stats(in + c.row * n + c.begin, c.len, threadIdx.x, blockDim.x));
  if (threadIdx.x == 0) partial[blockIdx.x] = st;
}

template <class T, bool LOG>
__device__ void softmax_split_write(const T* in, T* out, const Stats* partial, long long n, long long chunk,
                                    long long chunks) {
  const Chunk c = chunk_of(n, chunk, chunks);
  Stats a{NEG_INF, 0.f};
  for (long long k = threadIdx.x; k < chunks; k += blockDim.x) a = stats_merge(a, partial[c.row * chunks + k]);
  const Stats st = block_stats(a);
  const long long o = c.row * n + c.begin;
  write_row<T, LOG>(in + o, out + o, c.len, threadIdx.x, blockDim.x, st);
}

#define SOFTMAX_SPLIT_ENTRIES(dt, T)                                                                              \
  extern "C" __global__ void __launch_bounds__(1024) softmax_split_stats_##dt(                                   \
      const T* in, Stats* partial, long long n, long long chunk, long long chunks) {                             \
    softmax_split_stats<T>(in, partial, n, chunk, chunks);                                                        \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(1024) softmax_split_write_##dt(                                   \
      const T* in, T* out, const Stats* partial, long long n, long long chunk, long long chunks) {               \
    softmax_split_write<T, false>(in, out, partial, n, chunk, chunks);                                            \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(1024) log_softmax_split_write_##dt(                               \
      const T* in, T* out, const Stats* partial, long long n, long long chunk, long long chunks) {               \
    softmax_split_write<T, true>(in, out, partial, n, chunk, chunks);                                             \
  }

#define SOFTMAX_DTYPE(dt, T)                \
  SOFTMAX_ENTRIES(softmax, false, dt, T)    \
  SOFTMAX_ENTRIES(log_softmax, true, dt, T) \
  SOFTMAX_SPLIT_ENTRIES(dt, T)

SOFTMAX_DTYPE(f32, float)
SOFTMAX_DTYPE(f16, f16)
SOFTMAX_DTYPE(bf16, bf16)

// ---------------------------------------------------------------- backward
//
// softmax_backward_<dt>(y, dy, dx, rows, n, width) and log_softmax_backward_<dt>(...): from the
// forward's output y and its gradient dy (both dense [rows, n], like dx):
//   softmax:      dx = y * (dy - sum(dy * y))
//   log_softmax:  dx = dy - exp(y) * sum(dy)
// Same work split as the forward: `width` of 1..32 gives each row a group of that many lanes of a
// warp (rows up to 1024; 8 warps per block), width 0 gives each row a whole block, and split rows
// have softmax_split_grad_sum_* / log_... write each chunk's sum and softmax_split_grad_write_* /
// log_... add their row's sums and write their chunk. Two reads of a row: the first reduces
// (log_softmax reads only dy there), the second writes; f32 math throughout.
// Vector accesses when y, dy and dx sit at the same offset from 16-byte alignment (true for the
// dense buffers the host passes).

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
  __syncthreads();  // the previous row's readers are done with `total`
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

template <bool LOG>
__device__ __forceinline__ float grad_term(float y, float dy) {
  return LOG ? dy : dy * y;
}

template <bool LOG>
__device__ __forceinline__ float grad_out(float y, float dy, float s) {
  return LOG ? dy - expf(y) * s : y * (dy - s);
}

// This thread's part (elements t, t + nt, ... of the head, vectors and tail) of the row's sum.
template <class T, bool LOG>
__device__ __forceinline__ float row_grad_sum(const T* y, const T* dy, long long n, int t, int nt, bool vectors) {
  constexpr int V = 16 / sizeof(T);
  float acc = 0.f;
  const long long head = vectors ? aligned_head(dy, n) : n, nvec = (n - head) / V;
  for (long long k = t; k < head; k += nt) acc += grad_term<LOG>(to_f32(y[k]), to_f32(dy[k]));
  const uint4* vy = reinterpret_cast<const uint4*>(y + head);
  const uint4* vg = reinterpret_cast<const uint4*>(dy + head);
  for (long long k = t; k < nvec; k += nt) {
    Vec<T> a, b;
    if (!LOG) a.raw = vy[k];  // log_softmax sums dy alone
    b.raw = vg[k];
#pragma unroll
    for (int j = 0; j < V; ++j) acc += grad_term<LOG>(LOG ? 0.f : to_f32(a.e[j]), to_f32(b.e[j]));
  }
  for (long long k = head + nvec * V + t; k < n; k += nt) acc += grad_term<LOG>(to_f32(y[k]), to_f32(dy[k]));
  return acc;
}

template <class T, bool LOG>
__device__ __forceinline__ void row_grad_write(const T* y, const T* dy, T* dx, long long n, int t, int nt, bool vectors,
                                               float s) {
  constexpr int V = 16 / sizeof(T);
  const long long head = vectors ? aligned_head(dy, n) : n, nvec = (n - head) / V;
  for (long long k = t; k < head; k += nt) dx[k] = from_f32<T>(grad_out<LOG>(to_f32(y[k]), to_f32(dy[k]), s));
  const uint4* vy = reinterpret_cast<const uint4*>(y + head);
  const uint4* vg = reinterpret_cast<const uint4*>(dy + head);
  uint4* vx = reinterpret_cast<uint4*>(dx + head);
  for (long long k = t; k < nvec; k += nt) {
    Vec<T> a, b;
    a.raw = vy[k];
    b.raw = vg[k];
#pragma unroll
    for (int j = 0; j < V; ++j) a.e[j] = from_f32<T>(grad_out<LOG>(to_f32(a.e[j]), to_f32(b.e[j]), s));
    vx[k] = a.raw;
  }
  for (long long k = head + nvec * V + t; k < n; k += nt) dx[k] = from_f32<T>(grad_out<LOG>(to_f32(y[k]), to_f32(dy[k]), s));
}

template <class T, bool LOG>
__device__ void softmax_backward(const T* y, const T* dy, T* dx, long long rows, long long n, int width) {
  const unsigned long long a = (unsigned long long)y, b = (unsigned long long)dy, c = (unsigned long long)dx;
  const bool vectors = ((a ^ b) & 15) == 0 && ((a ^ c) & 15) == 0;
  if (width == 0) {
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
      const long long o = r * n;
      const float s = block_sum(row_grad_sum<T, LOG>(y + o, dy + o, n, threadIdx.x, blockDim.x, vectors));
      row_grad_write<T, LOG>(y + o, dy + o, dx + o, n, threadIdx.x, blockDim.x, vectors, s);
    }
    return;
  }
  // groups of `width` lanes per row; the loop runs over groups of rows so that its trip count, and
  // with it the shuffles, is uniform across the warp
  const int lane = threadIdx.x & 31, t = lane & (width - 1);
  const long long rows_per_warp = 32 / width, warps = blockDim.x >> 5;
  for (long long r0 = (blockIdx.x * warps + (threadIdx.x >> 5)) * rows_per_warp; r0 < rows;
       r0 += gridDim.x * warps * rows_per_warp) {
    const long long r = r0 + lane / width, o = r * n;
    float s = 0.f;
    if (r < rows) s = row_grad_sum<T, LOG>(y + o, dy + o, n, t, width, vectors);
    s = group_sum(s, width);
    if (r < rows) row_grad_write<T, LOG>(y + o, dy + o, dx + o, n, t, width, vectors, s);
  }
}

// __launch_bounds__(1024, 1): the block mode may use up to 1024 threads. Naming the minimum of one
// block per SM explicitly matters: without it ptxas (sm_80) squeezed this kernel into 32 registers
// and spilled; with it the kernel takes ~50 registers, no spills.
#define SOFTMAX_BACKWARD_ENTRIES(dt, T)                                                                             \
  extern "C" __global__ void __launch_bounds__(1024, 1)                                                             \
      softmax_backward_##dt(const T* y, const T* dy, T* dx, long long rows, long long n, int width) {              \
    softmax_backward<T, false>(y, dy, dx, rows, n, width);                                                          \
  }                                                                                                                 \
  extern "C" __global__ void __launch_bounds__(1024, 1)                                                             \
      log_softmax_backward_##dt(const T* y, const T* dy, T* dx, long long rows, long long n, int width) {          \
    softmax_backward<T, true>(y, dy, dx, rows, n, width);                                                           \
  }
SOFTMAX_BACKWARD_ENTRIES(f32, float)
SOFTMAX_BACKWARD_ENTRIES(f16, f16)
SOFTMAX_BACKWARD_ENTRIES(bf16, bf16)

template <class T, bool LOG>
__device__ void softmax_split_grad_sum(const T* y, const T* dy, float* partial, long long n, long long chunk,
                                       long long chunks) {
  const Chunk c = chunk_of(n, chunk, chunks);
  const long long o = c.row * n + c.begin;
  const bool vectors = (((unsigned long long)(y + o) ^ (unsigned long long)(dy + o)) & 15) == 0;
  const float s = block_sum(row_grad_sum<T, LOG>(y + o, dy + o, c.len, threadIdx.x, blockDim.x, vectors));
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

template <class T, bool LOG>
__device__ void softmax_split_grad_write(const T* y, const T* dy, T* dx, const float* partial, long long n,
                                         long long chunk, long long chunks) {
  const Chunk c = chunk_of(n, chunk, chunks);
  float a = 0.f;
  for (long long k = threadIdx.x; k < chunks; k += blockDim.x) a += partial[c.row * chunks + k];
  const float s = block_sum(a);
  const long long o = c.row * n + c.begin;
  const unsigned long long ya = (unsigned long long)(y + o), ga = (unsigned long long)(dy + o),
                           xa = (unsigned long long)(dx + o);
  const bool vectors = ((ya ^ ga) & 15) == 0 && ((ya ^ xa) & 15) == 0;
  row_grad_write<T, LOG>(y + o, dy + o, dx + o, c.len, threadIdx.x, blockDim.x, vectors, s);
}

#define SOFTMAX_SPLIT_BACKWARD(name, LOG, dt, T)                                                                  \
  extern "C" __global__ void __launch_bounds__(1024, 1) name##_split_grad_sum_##dt(                              \
      const T* y, const T* dy, float* partial, long long n, long long chunk, long long chunks) {                  \
    softmax_split_grad_sum<T, LOG>(y, dy, partial, n, chunk, chunks);                                             \
  }                                                                                                               \
  extern "C" __global__ void __launch_bounds__(1024, 1) name##_split_grad_write_##dt(                            \
      const T* y, const T* dy, T* dx, const float* partial, long long n, long long chunk, long long chunks) {     \
    softmax_split_grad_write<T, LOG>(y, dy, dx, partial, n, chunk, chunks);                                       \
  }
#define SOFTMAX_SPLIT_BACKWARD_DTYPE(dt, T)         \
  SOFTMAX_SPLIT_BACKWARD(softmax, false, dt, T)     \
  SOFTMAX_SPLIT_BACKWARD(log_softmax, true, dt, T)
SOFTMAX_SPLIT_BACKWARD_DTYPE(f32, float)
SOFTMAX_SPLIT_BACKWARD_DTYPE(f16, f16)
SOFTMAX_SPLIT_BACKWARD_DTYPE(bf16, bf16)
