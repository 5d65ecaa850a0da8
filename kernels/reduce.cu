// Reductions along one axis: sum, sum of squares, mean, max, min, argmax. f32/f16/bf16 inputs,
// f32 accumulation. The host views the contiguous input as [outer, n, inner] and reduces n.
//
//   inner == 1, short rows  -> reduce_rows_warp_*: one warp per row (a group of 1-16 lanes per row
//                              for rows of up to 64), 8 warps per block.
//   inner == 1, long rows   -> reduce_rows_block_*: one block per row (or per segment of a row when
//                              there are too few rows to fill the GPU; the segments' partial results
//                              then go through reduce_partials_*).
//   inner > 1               -> reduce_cols_*: a (bx, by) block, bx threads across `inner` so that
//                              each warp reads whole contiguous runs, by threads down `n`; the column
//                              is finished with a shared-memory tree over y. gridDim.y splits `n` into
//                              segments (partials again) when there are too few columns.
//
// Rows are read with 16-byte vector loads after a scalar head that reaches 16-byte alignment, so
// every row length gets vector loads.
#include "common.cuh"

// Accumulator: the value, and for argmax the index of that value within the row.
struct Acc {
  float v;
  long long i;
};

#define NEG_INF __uint_as_float(0xff800000u)
#define POS_INF __uint_as_float(0x7f800000u)
#define NO_INDEX 0x7fffffffffffffffLL

// Each op: identity, `load` (the transform applied to an input element, e.g. squaring), an
// associative and commutative `combine` (commutative so that the xor butterfly leaves the same bits
// in every lane), and `finish` (n is the full length of the reduced axis).
struct SumOp {
  static constexpr bool kIndex = false;
  __device__ static Acc identity() { return Acc{0.f, 0}; }
  __device__ static float load(float x) { return x; }
  __device__ static Acc combine(Acc a, Acc b) { return Acc{a.v + b.v, 0}; }
  __device__ static float finish(Acc a, long long) { return a.v; }
};
struct SumSqOp : SumOp {
  __device__ static float load(float x) { return x * x; }
};
struct MeanOp : SumOp {
  __device__ static float finish(Acc a, long long n) { return a.v / float(n); }
};
struct MaxOp {
  static constexpr bool kIndex = false;
  __device__ static Acc identity() { return Acc{NEG_INF, 0}; }
  __device__ static float load(float x) { return x; }
  __device__ static Acc combine(Acc a, Acc b) { return Acc{nan_max(a.v, b.v), 0}; }
  __device__ static float finish(Acc a, long long) { return a.v; }
};
struct MinOp {
  static constexpr bool kIndex = false;
  __device__ static Acc identity() { return Acc{POS_INF, 0}; }
  __device__ static float load(float x) { return x; }
  __device__ static Acc combine(Acc a, Acc b) { return Acc{nan_min(a.v, b.v), 0}; }
  __device__ static float finish(Acc a, long long) { return a.v; }
};
// As torch.argmax: NaN beats every number, and among equal values (or NaNs) the first index wins.
// Comparing indices, not visiting order, makes the combine order-independent.
struct ArgMaxOp {
  static constexpr bool kIndex = true;
  __device__ static Acc identity() { return Acc{NEG_INF, NO_INDEX}; }
  __device__ static float load(float x) { return x; }
  __device__ static Acc combine(Acc a, Acc b) {
    const bool an = a.v != a.v, bn = b.v != b.v;
    bool take_b;
    if (an || bn) {
      take_b = bn && (!an || b.i < a.i);
    } else {
      take_b = b.v > a.v || (b.v == a.v && b.i < a.i);
    }
    return take_b ? b : a;
  }
  __device__ static float finish(Acc a, long long) { return a.v; }
};

template <class Op>
__device__ __forceinline__ Acc step(Acc a, float x, long long i) {
  return Op::combine(a, Acc{Op::load(x), i});
}

// Reduction over aligned groups of `width` lanes (a power of two up to 32); every lane of a group
// gets its group's result. Every lane of the warp must call it.
template <class Op>
__device__ __forceinline__ Acc warp_reduce(Acc a, int width = 32) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    if (o >= width) continue;
    Acc b;
    b.v = __shfl_xor_sync(FULL_MASK, a.v, o);
    if constexpr (Op::kIndex) {
      b.i = __shfl_xor_sync(FULL_MASK, a.i, o);
    } else {
      b.i = 0;
    }
    a = Op::combine(a, b);
  }
  return a;
}

// Reduction over a 1-D block (blockDim.x a multiple of 32); the result is valid in thread 0. Every
// thread of the block must call it.
template <class Op>
__device__ Acc block_reduce(Acc a) {
  EMU_SHARED(float, warp_v, [32]);
  EMU_SHARED(long long, warp_i, [32]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  a = warp_reduce<Op>(a);
  __syncthreads();  // the previous call's readers are done with warp_v
  if (lane == 0) {
    warp_v[warp] = a.v;
    if constexpr (Op::kIndex) warp_i[warp] = a.i;
  }
  __syncthreads();
  if (warp == 0) {
    Acc b = Op::identity();
    if (lane < warps) {
      b.v = warp_v[lane];
      if constexpr (Op::kIndex) b.i = warp_i[lane];
    }
    a = warp_reduce<Op>(b);
  }
  return a;
}

// Calls f(k, x) for the elements k = 0..len-1 of p that thread t of nt owns: a scalar head up to
// 16-byte alignment, then 16-byte vectors (4 f32 or 8 f16/bf16), then a scalar tail.
template <class T, class F>
__device__ __forceinline__ void for_each_element(const T* p, long long len, int t, int nt, F f) {
  constexpr int V = 16 / sizeof(T);
  union Vec {
    uint4 raw;
    T e[V];
  };
  long long head = (long long)((16 - ((unsigned long long)p & 15)) & 15) / (long long)sizeof(T);
  if (head > len) head = len;
  for (long long k = t; k < head; k += nt) f(k, to_f32(p[k]));
  const long long nvec = (len - head) / V;
  const uint4* vp = reinterpret_cast<const uint4*>(p + head);
  for (long long k = t; k < nvec; k += nt) {
    Vec v;
    v.raw = vp[k];
#pragma unroll
    for (int j = 0; j < V; ++j) f(head + k * V + j, to_f32(v.e[j]));
  }
  for (long long k = head + nvec * V + t; k < len; k += nt) f(k, to_f32(p[k]));
}

template <class Op, class T>
__device__ __forceinline__ Acc scan(const T* p, long long begin, long long end, int t, int nt) {
  Acc a = Op::identity();
  for_each_element(p + begin, end - begin, t, nt, [&](long long k, float x) { a = step<Op>(a, x, begin + k); });
  return a;
}

template <class Op, class Out>
__device__ __forceinline__ void store(Out* out, long long i, Acc a, long long n) {
  if constexpr (Op::kIndex) {
    out[i] = a.i;
  } else {
    out[i] = from_f32<Out>(Op::finish(a, n));
  }
}

// Writes the result of work item `w` (output `w / splits`, segment `w % splits`): the final value
// when the axis is not split, else the partial accumulator for reduce_partials.
template <class Op, class Out>
__device__ __forceinline__ void emit(Acc a, long long out_index, long long s, long long splits, long long n, Out* out,
                                     float* pv, long long* pi) {
  if (splits == 1) {
    store<Op>(out, out_index, a, n);
  } else {
    pv[out_index * splits + s] = a.v;
    if constexpr (Op::kIndex) pi[out_index * splits + s] = a.i;
  }
}

// Each warp reduces 32 / width rows at a time, `width` lanes per row: short rows (width = the row
// length rounded up to a power of two) do not leave most of a warp idle. The loop runs over groups
// of rows so that its trip count, and with it the shuffles, is uniform across the warp.
template <class Op, class T, class Out>
__device__ void rows_warp(const T* in, long long rows, long long n, int width, Out* out) {
  const int lane = threadIdx.x & 31, t = lane & (width - 1);
  const long long rows_per_warp = 32 / width, warps = blockDim.x >> 5;
  for (long long r0 = (blockIdx.x * warps + (threadIdx.x >> 5)) * rows_per_warp; r0 < rows;
       r0 += gridDim.x * warps * rows_per_warp) {
    const long long r = r0 + lane / width;
    Acc a = r < rows ? scan<Op>(in + r * n, 0, n, t, width) : Op::identity();
    a = warp_reduce<Op>(a, width);
    if (t == 0 && r < rows) store<Op>(out, r, a, n);
  }
}

template <class Op, class T, class Out>
__device__ void rows_block(const T* in, long long rows, long long n, long long seg, long long splits, Out* out,
                           float* pv, long long* pi) {
  for (long long w = blockIdx.x; w < rows * splits; w += gridDim.x) {
    const long long r = w / splits, s = w % splits;
    const long long begin = s * seg, end = min(n, begin + seg);
    const Acc a = block_reduce<Op>(scan<Op>(in + r * n, begin, end, threadIdx.x, blockDim.x));
    if (threadIdx.x == 0) emit<Op>(a, r, s, splits, n, out, pv, pi);
  }
}

// Second pass of a split axis: one warp per output combines its `splits` partials in f32.
template <class Op, class Out>
__device__ void partials(const float* pv, const long long* pi, long long rows, long long splits, long long n,
                         Out* out) {
  const int lane = threadIdx.x & 31;
  const long long warps = blockDim.x >> 5;
  for (long long r = blockIdx.x * warps + (threadIdx.x >> 5); r < rows; r += gridDim.x * warps) {
    Acc a = Op::identity();
    for (long long s = lane; s < splits; s += 32) {
      Acc b{pv[r * splits + s], 0};
      if constexpr (Op::kIndex) b.i = pi[r * splits + s];
      a = Op::combine(a, b);
    }
    a = warp_reduce<Op>(a);
    if (lane == 0) store<Op>(out, r, a, n);
  }
}

// blockDim = (bx, by), bx * by <= 256, both powers of two. Block tile t covers columns
// (t % tiles_per_outer) * bx .. + bx of outer index t / tiles_per_outer; blockIdx.y is the segment.
template <class Op, class T, class Out>
__device__ void cols(const T* in, long long outer, long long n, long long inner, long long seg, long long splits,
                     Out* out, float* pv, long long* pi) {
  EMU_SHARED(float, sv, [256]);
  EMU_SHARED(long long, si, [256]);
  const int tx = threadIdx.x, ty = threadIdx.y, bx = blockDim.x, by = blockDim.y;
  const int slot = ty * bx + tx;
  const long long tiles_per_outer = (inner + bx - 1) / bx;
  const long long s = blockIdx.y, begin = s * seg, end = min(n, begin + seg);
  for (long long tile = blockIdx.x; tile < outer * tiles_per_outer; tile += gridDim.x) {
    const long long o = tile / tiles_per_outer, c = (tile % tiles_per_outer) * bx + tx;
    Acc a = Op::identity();
    if (c < inner) {
      const T* col = in + o * n * inner + c;
      for (long long k = begin + ty; k < end; k += by) a = step<Op>(a, to_f32(col[k * inner]), k);
    }
    sv[slot] = a.v;
    if constexpr (Op::kIndex) si[slot] = a.i;
    __syncthreads();
    for (int h = by >> 1; h > 0; h >>= 1) {
      if (ty < h) {
        Acc b{sv[slot + h * bx], 0};
        if constexpr (Op::kIndex) b.i = si[slot + h * bx];
        a = Op::combine(a, b);
        sv[slot] = a.v;
        if constexpr (Op::kIndex) si[slot] = a.i;
      }
      __syncthreads();
    }
    if (ty == 0 && c < inner) emit<Op>(a, o * inner + c, s, splits, n, out, pv, pi);
  }
}

#define REDUCE_ENTRIES(op, Op, dt, T, Out)                                                                        \
  extern "C" __global__ void reduce_rows_warp_##op##_##dt(const T* in, long long rows, long long n, int width,     \
                                                          Out* out) {                                             \
    rows_warp<Op, T, Out>(in, rows, n, width, out);                                                               \
  }                                                                                                               \
  extern "C" __global__ void reduce_rows_block_##op##_##dt(const T* in, long long rows, long long n, long long seg, \
                                                           long long splits, Out* out, float* pv, long long* pi) { \
    rows_block<Op, T, Out>(in, rows, n, seg, splits, out, pv, pi);                                                \
  }                                                                                                               \
  extern "C" __global__ void reduce_cols_##op##_##dt(const T* in, long long outer, long long n, long long inner,    \
                                                     long long seg, long long splits, Out* out, float* pv,        \
                                                     long long* pi) {                                             \
    cols<Op, T, Out>(in, outer, n, inner, seg, splits, out, pv, pi);                                              \
  }                                                                                                               \
  extern "C" __global__ void reduce_partials_##op##_##dt(const float* pv, const long long* pi, long long rows,     \
                                                         long long splits, long long n, Out* out) {               \
    partials<Op, Out>(pv, pi, rows, splits, n, out);                                                              \
  }

#define REDUCE_DTYPE(dt, T)                      \
  REDUCE_ENTRIES(sum, SumOp, dt, T, T)           \
  REDUCE_ENTRIES(sum_sq, SumSqOp, dt, T, T)      \
  REDUCE_ENTRIES(mean, MeanOp, dt, T, T)         \
  REDUCE_ENTRIES(max, MaxOp, dt, T, T)           \
  REDUCE_ENTRIES(min, MinOp, dt, T, T)           \
  REDUCE_ENTRIES(argmax, ArgMaxOp, dt, T, long long)

REDUCE_DTYPE(f32, float)
REDUCE_DTYPE(f16, f16)
REDUCE_DTYPE(bf16, bf16)
