// Mutual nearest neighbours between local feature maps (SelaVPR's re-ranking score), per pair p of
// maps a[p] [La, D] and b[p] [Lb, D] (f32, dense), without the similarity matrix S = a b^T in memory:
//
//   mnn_tiles_f32: a block per (strip of MNN_TILE rows of a, pair). It walks the columns of S in
//                  tiles of MNN_TILE, each tile computed from shared-memory slices of a and b. It keeps
//                  each row's best column over all tiles (ascending j, in registers) and writes each
//                  row's arg-max to row_arg [P, La]; for every column it writes the strip's best row to
//                  col_part [P, strips, Lb].
//   mnn_count_f32: a block per pair. Position i of a is a mutual match when the best row of column
//                  row_arg[i] over all strips is i; the count, with 1 turned into 0 (SelaVPR's quirk),
//                  goes to counts[p] (i64).
//
// S[i, j] is the sum over d = 0, 1, ..., D-1, in that order, of the products a[i, d] * b[j, d] in
// double precision (each product of two floats is exact there, so a compiler contracting the sum
// into fused multiply-adds rounds the same way), rounded once to float. The CPU twin sums in the same
// order, so both compute the same S bit for bit and pick the same arg-max.
//
// Arg-max order (torch.argmax's): larger value first, NaN above everything, -0 equal to +0, and
// equal values to the lower index. A candidate is the 64-bit key (order-preserving 32-bit image of
// the value) << 32 | (0xffffffff - index), so the best candidate is the largest key and reductions are
// plain maxima in any order. Key 0 is no candidate (no value maps to it).
#include "common.cuh"

#define MNN_TILE 64
#define MNN_DEPTH 16
#define MNN_THREADS 256

// The order-preserving image of a float: NaN above +inf, -0 as +0; never 0.
__device__ __forceinline__ unsigned mnn_value_key(float v) {
  if (v != v) return 0xffffffffu;
  if (v == 0.f) return 0x80000000u;
  const unsigned u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ unsigned long long mnn_candidate(float v, unsigned index) {
  return ((unsigned long long)mnn_value_key(v) << 32) | (unsigned long long)(0xffffffffu - index);
}

__device__ __forceinline__ unsigned mnn_index(unsigned long long candidate) {
  return 0xffffffffu - (unsigned)(candidate & 0xffffffffull);
}

__device__ __forceinline__ unsigned long long mnn_better(unsigned long long x, unsigned long long y) {
  return x > y ? x : y;
}

// a: [P, La, D] with pairs a_stride apart (0: one map for every pair), b: [P, Lb, D];
// row_arg: [P, La] (i32); col_part: [P, strips, Lb] candidates.
// Grid (strips = ceil(La / MNN_TILE), P), MNN_THREADS threads: thread (ty, tx) = (tid / 16, tid % 16)
// computes rows ty * 4 + r and columns tx * 4 + c (r, c < 4) of each 64 x 64 tile.
extern "C" __global__ void __launch_bounds__(MNN_THREADS)
    mnn_tiles_f32(const float* __restrict__ a, const float* __restrict__ b, int* __restrict__ row_arg,
                  unsigned long long* __restrict__ col_part, long long a_stride, long long la, long long lb,
                  long long d) {
  EMU_SHARED(double, sa, [MNN_DEPTH][MNN_TILE]);
  EMU_SHARED(double, sb, [MNN_DEPTH][MNN_TILE]);
  EMU_SHARED(unsigned long long, col_best, [16][MNN_TILE]);
  const long long p = blockIdx.y, strips = gridDim.x, i0 = (long long)blockIdx.x * MNN_TILE;
  const float* ap = a + p * a_stride;
  const float* bp = b + p * lb * d;
  const unsigned tid = threadIdx.x, ty = tid / 16, tx = tid % 16;
  unsigned long long row_best[4] = {0, 0, 0, 0};
  for (long long j0 = 0; j0 < lb; j0 += MNN_TILE) {
    double acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.0;
    for (long long d0 = 0; d0 < d; d0 += MNN_DEPTH) {
      const int depth = (int)min(d - d0, (long long)MNN_DEPTH);
      // 64 rows x 16 depths of each operand, as doubles; rows past the end read as 0
      for (unsigned e = tid; e < MNN_TILE * MNN_DEPTH; e += MNN_THREADS) {
        const unsigned row = e / MNN_DEPTH, k = e % MNN_DEPTH;
        const long long i = i0 + row, j = j0 + row;
        const bool in_depth = (long long)k < depth;
        sa[k][row] = (in_depth && i < la) ? (double)ap[i * d + d0 + k] : 0.0;
        sb[k][row] = (in_depth && j < lb) ? (double)bp[j * d + d0 + k] : 0.0;
      }
      __syncthreads();
      for (int k = 0; k < depth; ++k) {
        double x[4], y[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) x[r] = sa[k][ty * 4 + r];
#pragma unroll
        for (int c = 0; c < 4; ++c) y[c] = sb[k][tx * 4 + c];
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[r][c] += x[r] * y[c];
      }
      __syncthreads();
    }
    // rows: this thread's 4 columns, then the 16 threads of the row group (lanes of one half-warp)
    unsigned long long col_mine[4] = {0, 0, 0, 0};
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const long long i = i0 + ty * 4 + r;
      unsigned long long best = 0;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const long long j = j0 + tx * 4 + c;
        if (j < lb && i < la) {
          const unsigned long long cand_row = mnn_candidate((float)acc[r][c], (unsigned)j);
          const unsigned long long cand_col = mnn_candidate((float)acc[r][c], (unsigned)i);
          best = mnn_better(best, cand_row);
          col_mine[c] = mnn_better(col_mine[c], cand_col);
        }
      }
#pragma unroll
      for (int o = 8; o > 0; o >>= 1) best = mnn_better(best, __shfl_xor_sync(FULL_MASK, best, o));
      row_best[r] = mnn_better(row_best[r], best);
    }
    // columns: the 16 row groups through shared memory
#pragma unroll
    for (int c = 0; c < 4; ++c) col_best[ty][tx * 4 + c] = col_mine[c];
    __syncthreads();
    if (tid < MNN_TILE && j0 + tid < lb) {
      unsigned long long best = 0;
      for (int g = 0; g < 16; ++g) best = mnn_better(best, col_best[g][tid]);
      col_part[(p * strips + blockIdx.x) * lb + j0 + tid] = best;
    }
    __syncthreads();  // col_best is rewritten by the next tile
  }
  if (tx == 0) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const long long i = i0 + ty * 4 + r;
      if (i < la) row_arg[p * la + i] = (int)mnn_index(row_best[r]);
    }
  }
}

// row_arg: [P, La], col_part: [P, strips, Lb] from mnn_tiles_f32; counts: [P]. A block per pair,
// MNN_THREADS threads.
extern "C" __global__ void __launch_bounds__(MNN_THREADS)
    mnn_count_f32(const int* __restrict__ row_arg, const unsigned long long* __restrict__ col_part,
                  long long* __restrict__ counts, long long la, long long lb, long long strips) {
  EMU_SHARED(unsigned, warp_counts, [MNN_THREADS / 32]);
  const long long p = blockIdx.x;
  unsigned mine = 0;
  for (long long i = threadIdx.x; i < la; i += MNN_THREADS) {
    const long long j = row_arg[p * la + i];
    unsigned long long best = 0;
    for (long long s = 0; s < strips; ++s) best = mnn_better(best, col_part[(p * strips + s) * lb + j]);
    mine += mnn_index(best) == (unsigned)i ? 1u : 0u;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mine += __shfl_xor_sync(FULL_MASK, mine, o);
  if (threadIdx.x % 32 == 0) warp_counts[threadIdx.x / 32] = mine;
  __syncthreads();
  if (threadIdx.x == 0) {
    long long total = 0;
    for (int w = 0; w < MNN_THREADS / 32; ++w) total += warp_counts[w];
    // SelaVPR scores exactly one mutual match as 0 (see src/ops/mnn/mod.rs)
    counts[p] = total == 1 ? 0 : total;
  }
}
