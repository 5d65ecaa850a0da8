// Fused attention, softmax(q k^T * scale) v per batch entry and head, flash-attention style: no
// [L, L] matrix ever reaches global memory. q, k, v, the output and its gradient are [B, H, L, D]
// views with any batch, head and position strides and a stride-1 last axis (the views of a fused
// qkv projection are read in place). f32 math for every dtype; D up to 128 (template DMAX = 64 or
// 128, the runtime D masked inside it); any L, tails masked.
//
// Thread layout of every SIMT kernel: 256 threads as a 16 x 16 grid; thread (ty, tx) owns rows
// 4ty .. 4ty+3 of the block's 64 resident rows, the streamed columns tx, tx + 16, ... of a score
// tile and the head-dimension columns tx, tx + 16, ... of its accumulators. Row reductions are
// xor shuffles within the 16 lanes of a half-warp. Tiles live in dynamic shared memory as f32
// with rows of D + 1 floats (odd, so 16 rows read at the same column hit 16 distinct banks).
//
//   attention_forward_f32_*      a block per 64 queries of one (b, h); K and V streamed in tiles
//                                of 64 keys (K, then V, through one buffer); online softmax with a
//                                running max and sum per row; writes O and the log-sum-exp (f32
//                                [B, H, L]) that the backward recomputes P from.
//   attention_forward_mma_*      the same for bf16/f16 on tensor cores (mma.sync, see attn_tc
//                                below): 4 warps of 16 queries each.
//   attention_backward_dot_*     Dv[b, h, i] = sum_d dO[i, d] * O[i, d], a warp per row.
//   attention_backward_dq_*      a block per 64 queries: streams K and V in tiles of 32 keys,
//                                P = exp(scale q k^T - lse), dS = P (dO v^T - Dv), dQ = scale dS K.
//   attention_backward_dkv_*     a block per 64 keys: streams Q and dO in tiles of 32 queries,
//                                dV = P^T dO, dK = scale dS^T Q.
// The backward is deterministic: every gradient element is summed by one thread, no atomics.
#include "common.cuh"

#define NEG_INF __uint_as_float(0xff800000u)

// Mirrors `AttentionParams` in src/ops/attention/gpu.rs. Strides in elements, of the batch, head
// and position axes of q, k, v, the output o and its gradient g.
struct AttentionParams {
  long long heads, len, dim;
  long long q[3], k[3], v[3], o[3], g[3];
  double scale;
};
EMU_ABI_LAYOUT(AttentionParams, heads, len, dim, q, k, v, o, g, scale);

namespace attn {
constexpr int THREADS = 256;
constexpr int ROWS = 64;       // resident rows per block: queries (forward, dQ) or keys (dK, dV)
constexpr int FWD_COLS = 64;   // keys per streamed tile in the forward
constexpr int BWD_COLS = 32;   // keys (dQ) or queries (dK, dV) per streamed tile in the backward

// Rows [r0, r0 + n) of one head of an operand (row stride ls) into s (row stride lds) as f32;
// rows at or past `len` become zero.
template <class T>
__device__ __forceinline__ void load_rows(float* s, int lds, const T* g, long long ls, long long r0, int n,
                                          long long len, int dim) {
  for (int i = threadIdx.x; i < n * dim; i += THREADS) {
    const int r = i / dim, d = i - r * dim;
    const long long gr = r0 + r;
    s[r * lds + d] = gr < len ? to_f32(g[gr * ls + d]) : 0.0f;
  }
}

// Max and sum over the 16 lanes of a half-warp (the threads that share a row).
__device__ __forceinline__ float row_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
  return v;
}
__device__ __forceinline__ float row_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
  return v;
}

// Block index -> (batch entry * heads + head, first resident row).
__device__ __forceinline__ void block_tile(const AttentionParams& p, long long& bh, long long& r0) {
  const long long tiles = (p.len + ROWS - 1) / ROWS;
  bh = (long long)blockIdx.x / tiles;
  r0 = ((long long)blockIdx.x % tiles) * ROWS;
}

template <class T, int DMAX>
__device__ void forward(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, T* __restrict__ O,
                        float* __restrict__ lse, const AttentionParams& p) {
  constexpr int DJ = DMAX / 16, PLD = FWD_COLS + 1;
  EMU_DYNAMIC_SHARED(float, smem);
  const int dim = int(p.dim), lds = dim + 1;
  float* qs = smem;                  // ROWS x lds
  float* kv = qs + ROWS * lds;       // FWD_COLS x lds: this tile's K, then its V
  float* ps = kv + FWD_COLS * lds;   // ROWS x PLD: exp(s - running max)

  long long bh, q0;
  block_tile(p, bh, q0);
  const long long b = bh / p.heads, h = bh % p.heads;
  Q += b * p.q[0] + h * p.q[1];
  K += b * p.k[0] + h * p.k[1];
  V += b * p.v[0] + h * p.v[1];
  O += b * p.o[0] + h * p.o[1];
  lse += bh * p.len;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const float scale = float(p.scale);

  float o[4][DJ], m[4], l[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = NEG_INF;
    l[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < DJ; ++j) o[i][j] = 0.0f;
  }
  load_rows(qs, lds, Q, p.q[2], q0, ROWS, p.len, dim);

  for (long long k0 = 0; k0 < p.len; k0 += FWD_COLS) {
    __syncthreads();  // Q is stored; the previous tile's readers of V and P are done
    load_rows(kv, lds, K, p.k[2], k0, FWD_COLS, p.len, dim);
    __syncthreads();
    float s[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) s[i][j] = 0.0f;
    for (int d = 0; d < dim; ++d) {
      float a[4], c[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = qs[(4 * ty + i) * lds + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) c[j] = kv[(tx + 16 * j) * lds + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) s[i][j] = fmaf(a[i], c[j], s[i][j]);
    }
    // Online softmax: the new running max rescales what was summed so far. Column k0 is a real
    // key, so every row's max is finite from the first tile on and exp(-inf - max) is 0.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float mx = m[i];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        s[i][j] = k0 + tx + 16 * j < p.len ? s[i][j] * scale : NEG_INF;
        mx = fmaxf(mx, s[i][j]);
      }
      mx = row_max(mx);
      const float alpha = expf(m[i] - mx);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float e = expf(s[i][j] - mx);
        ps[(4 * ty + i) * PLD + tx + 16 * j] = e;
        sum += e;
      }
      l[i] = l[i] * alpha + row_sum(sum);
      m[i] = mx;
#pragma unroll
      for (int j = 0; j < DJ; ++j) o[i][j] *= alpha;
    }
    __syncthreads();  // every thread is done with K and has written its P
    load_rows(kv, lds, V, p.v[2], k0, FWD_COLS, p.len, dim);
    __syncthreads();
    const int cols = int(min((long long)FWD_COLS, p.len - k0));
    for (int c = 0; c < cols; ++c) {
      float pr[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pr[i] = ps[(4 * ty + i) * PLD + c];
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = tx + 16 * j;
        const float vv = d < dim ? kv[c * lds + d] : 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) o[i][j] = fmaf(pr[i], vv, o[i][j]);
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const long long r = q0 + 4 * ty + i;
    if (r >= p.len) continue;
    const float inv = 1.0f / l[i];
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tx + 16 * j;
      if (d < dim) O[r * p.o[2] + d] = from_f32<T>(o[i][j] * inv);
    }
    if (tx == 0) lse[r] = m[i] + logf(l[i]);
  }
}

// Dv of every row: a warp per row, the rows of the grid in turn.
template <class T>
__device__ void backward_dot(const T* __restrict__ O, const T* __restrict__ G, float* __restrict__ dv,
                             const AttentionParams& p, long long rows) {
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  for (long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); row < rows; row += warps) {
    const long long i = row % p.len, bh = row / p.len, b = bh / p.heads, h = bh % p.heads;
    const T* o = O + b * p.o[0] + h * p.o[1] + i * p.o[2];
    const T* g = G + b * p.g[0] + h * p.g[1] + i * p.g[2];
    float acc = 0.0f;
    for (int d = lane; d < int(p.dim); d += 32) acc = fmaf(to_f32(o[d]), to_f32(g[d]), acc);
    acc = warp_sum(acc);
    if (lane == 0) dv[row] = acc;
  }
}

// The two backward kernels in one. KV = false: resident rows are queries (Q and dO), the streamed
// ones keys (K and V), and the output is dQ = scale dS K. KV = true: resident rows are keys (K and
// V), the streamed ones queries (Q and dO), the outputs dK = scale dS^T Q and dV = P^T dO. Either
// way x = R1 . S1 and y = R2 . S2 per (resident, streamed) pair are the score and dP, transposed
// for KV. Outputs are dense [B, H, L, D].
template <class T, int DMAX, bool KV>
__device__ void backward(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                         const T* __restrict__ G, const float* __restrict__ lse, const float* __restrict__ dvec,
                         T* __restrict__ out1, T* __restrict__ out2, const AttentionParams& p) {
  constexpr int DJ = DMAX / 16, PLD = BWD_COLS + 1;
  EMU_DYNAMIC_SHARED(float, smem);
  const int dim = int(p.dim), lds = dim + 1;
  float* r1 = smem;                  // ROWS x lds
  float* r2 = r1 + ROWS * lds;       // ROWS x lds
  float* s1 = r2 + ROWS * lds;       // BWD_COLS x lds
  float* s2 = s1 + BWD_COLS * lds;   // BWD_COLS x lds
  float* ds = s2 + BWD_COLS * lds;   // ROWS x PLD: dS (transposed for KV)
  float* ps = ds + ROWS * PLD;       // ROWS x PLD: P^T (KV only)

  long long bh, r0;
  block_tile(p, bh, r0);
  const long long b = bh / p.heads, h = bh % p.heads;
  Q += b * p.q[0] + h * p.q[1];
  K += b * p.k[0] + h * p.k[1];
  V += b * p.v[0] + h * p.v[1];
  G += b * p.g[0] + h * p.g[1];
  lse += bh * p.len;
  dvec += bh * p.len;
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
  const float scale = float(p.scale);

  if (KV) {
    load_rows(r1, lds, K, p.k[2], r0, ROWS, p.len, dim);
    load_rows(r2, lds, V, p.v[2], r0, ROWS, p.len, dim);
  } else {
    load_rows(r1, lds, Q, p.q[2], r0, ROWS, p.len, dim);
    load_rows(r2, lds, G, p.g[2], r0, ROWS, p.len, dim);
  }
  float acc1[4][DJ], acc2[4][DJ];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < DJ; ++j) acc1[i][j] = acc2[i][j] = 0.0f;

  for (long long c0 = 0; c0 < p.len; c0 += BWD_COLS) {
    __syncthreads();  // the resident rows are stored; the previous tile's readers are done
    if (KV) {
      load_rows(s1, lds, Q, p.q[2], c0, BWD_COLS, p.len, dim);
      load_rows(s2, lds, G, p.g[2], c0, BWD_COLS, p.len, dim);
    } else {
      load_rows(s1, lds, K, p.k[2], c0, BWD_COLS, p.len, dim);
      load_rows(s2, lds, V, p.v[2], c0, BWD_COLS, p.len, dim);
    }
    __syncthreads();
    float x[4][2], y[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) x[i][j] = y[i][j] = 0.0f;
    for (int d = 0; d < dim; ++d) {
      float a1[4], a2[4], c1[2], c2[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a1[i] = r1[(4 * ty + i) * lds + d];
        a2[i] = r2[(4 * ty + i) * lds + d];
      }
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        c1[j] = s1[(tx + 16 * j) * lds + d];
        c2[j] = s2[(tx + 16 * j) * lds + d];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          x[i][j] = fmaf(a1[i], c1[j], x[i][j]);
          y[i][j] = fmaf(a2[i], c2[j], y[i][j]);
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const long long row = r0 + 4 * ty + i, col = c0 + tx + 16 * j;
        const long long query = KV ? col : row;
        float pv = 0.0f, dsv = 0.0f;
        if (row < p.len && col < p.len) {
          pv = expf(x[i][j] * scale - lse[query]);
          dsv = pv * (y[i][j] - dvec[query]);
        }
        ds[(4 * ty + i) * PLD + tx + 16 * j] = dsv;
        if (KV) ps[(4 * ty + i) * PLD + tx + 16 * j] = pv;
      }
    __syncthreads();
    const int cols = int(min((long long)BWD_COLS, p.len - c0));
    for (int c = 0; c < cols; ++c) {
      float dr[4], pr[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        dr[i] = ds[(4 * ty + i) * PLD + c];
        pr[i] = KV ? ps[(4 * ty + i) * PLD + c] : 0.0f;
      }
#pragma unroll
      for (int j = 0; j < DJ; ++j) {
        const int d = tx + 16 * j;
        const float v1 = d < dim ? s1[c * lds + d] : 0.0f;
        const float v2 = KV && d < dim ? s2[c * lds + d] : 0.0f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc1[i][j] = fmaf(dr[i], v1, acc1[i][j]);
          if (KV) acc2[i][j] = fmaf(pr[i], v2, acc2[i][j]);
        }
      }
    }
  }

  const long long base = bh * p.len * p.dim;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const long long r = r0 + 4 * ty + i;
    if (r >= p.len) continue;
#pragma unroll
    for (int j = 0; j < DJ; ++j) {
      const int d = tx + 16 * j;
      if (d >= dim) continue;
      out1[base + r * p.dim + d] = from_f32<T>(acc1[i][j] * scale);
      if (KV) out2[base + r * p.dim + d] = from_f32<T>(acc2[i][j]);
    }
  }
}
}  // namespace attn

// ================================================================ bf16 / f16 forward: tensor cores
// mma.sync m16n8k16 with f32 accumulation, flash-attention-2 style: 4 warps, 16 query rows each
// (a block per 64 queries of one (b, h)); Q's A fragments stay in registers for the whole key loop;
// per tile of 64 keys, S = Q K^T is 8 n8 accumulators per warp, the online softmax runs on the
// accumulator layout (a row's 8 columns of an n8 tile are spread over the 4 lanes of a quad, so a
// row reduction is two xor shuffles), and the probabilities are repacked, without shared memory,
// as the A fragments of O += P V (the C layout of two adjacent n8 tiles is the A layout of one
// k16 step). K and V tiles are stored as they are in global memory, rows padded by 16 bytes so the
// 8 rows of every ldmatrix phase fall in distinct bank groups; K is read with ldmatrix, V with
// ldmatrix.trans. Columns past D and rows past L are zero in shared memory; keys past L are
// masked to -inf before the softmax.
namespace attn_tc {
constexpr int THREADS = 128, ROWS = 64, COLS = 64, PAD = 8;

__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const bf16*) {
  emu::mma_m16n8k16_bf16(d, a, b, d);
}
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const f16*) {
  emu::mma_m16n8k16_f16(d, a, b, d);
}

// Two floats as one register of an A fragment: the lower column in the low half.
template <class T>
__device__ __forceinline__ unsigned pack(float lo, float hi) {
  return unsigned(from_f32<T>(lo).bits) | (unsigned(from_f32<T>(hi).bits) << 16);
}

// Rows [r0, r0 + ROWS) of one head (row stride ls), columns [0, DMAX), into s (row stride
// DMAX + PAD): 16-byte chunks, copied as one vector when whole and aligned; zero past `dim` and
// past `len`.
template <class T, int DMAX>
__device__ __forceinline__ void load_tile(T* s, const T* g, long long ls, long long r0, long long len, int dim) {
  constexpr int CHUNKS = DMAX / 8, LDS = DMAX + PAD;
  for (int c = threadIdx.x; c < ROWS * CHUNKS; c += THREADS) {
    const int r = c / CHUNKS, d0 = (c % CHUNKS) * 8;
    const long long gr = r0 + r;
    T* dst = s + r * LDS + d0;
    const int valid = gr < len ? min(8, dim - d0) : 0;
    if (valid == 8 && (reinterpret_cast<unsigned long long>(g + gr * ls + d0) & 15) == 0) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(g + gr * ls + d0);
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) dst[i].bits = i < valid ? g[gr * ls + d0 + i].bits : (unsigned short)0;
    }
  }
}

template <class T, int DMAX>
__device__ void forward(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V, T* __restrict__ O,
                        float* __restrict__ lse, const AttentionParams& p) {
  constexpr int LDS = DMAX + PAD, KSTEPS = DMAX / 16, NT = COLS / 8, DT = DMAX / 8;
  EMU_DYNAMIC_SHARED(uint4, smem);
  T* qs = reinterpret_cast<T*>(smem);  // ROWS x LDS
  T* ks = qs + ROWS * LDS;             // COLS x LDS
  T* vs = ks + COLS * LDS;             // COLS x LDS

  long long bh, q0;
  attn::block_tile(p, bh, q0);
  const long long b = bh / p.heads, h = bh % p.heads;
  Q += b * p.q[0] + h * p.q[1];
  K += b * p.k[0] + h * p.k[1];
  V += b * p.v[0] + h * p.v[1];
  O += b * p.o[0] + h * p.o[1];
  lse += bh * p.len;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int dim = int(p.dim);
  const float scale = float(p.scale);

  load_tile<T, DMAX>(qs, Q, p.q[2], q0, p.len, dim);
  __syncthreads();
  unsigned qf[KSTEPS][4];
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk)
    emu::ldmatrix_x4(qf[kk], qs + (warp * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8);

  // this thread's rows are g and g + 8 of the warp's 16: accumulator elements 0-1 and 2-3
  float o[DT][4], m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
#pragma unroll
  for (int i = 0; i < DT; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[i][e] = 0.0f;

  for (long long k0 = 0; k0 < p.len; k0 += COLS) {
    __syncthreads();  // the previous tile's readers of K and V are done
    load_tile<T, DMAX>(ks, K, p.k[2], k0, p.len, dim);
    load_tile<T, DMAX>(vs, V, p.v[2], k0, p.len, dim);
    __syncthreads();

    float s[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk)
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        unsigned bfr[4];
        const int j = lane >> 3, r = lane & 7;
        emu::ldmatrix_x4(bfr, ks + (np * 16 + (j >> 1) * 8 + r) * LDS + kk * 16 + (j & 1) * 8);
        const unsigned b0[2] = {bfr[0], bfr[1]}, b1[2] = {bfr[2], bfr[3]};
        mma(s[2 * np], qf[kk], b0, Q);
        mma(s[2 * np + 1], qf[kk], b1, Q);
      }

    // Online softmax per row; column k0 is a real key, so every row's max is finite.
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = k0 + n * 8 + 2 * t + (e & 1) < p.len ? s[n][e] * scale : NEG_INF;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m[r];
#pragma unroll
      for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(FULL_MASK, mx, 2));
      const float alpha = expf(m[r] - mx);
      m[r] = mx;
      float sum = 0.0f;  // this lane's columns only: the quad's sums are added at the end
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          s[n][2 * r + c] = expf(s[n][2 * r + c] - mx);
          sum += s[n][2 * r + c];
        }
      l[r] = l[r] * alpha + sum;
#pragma unroll
      for (int i = 0; i < DT; ++i) {
        o[i][2 * r] *= alpha;
        o[i][2 * r + 1] *= alpha;
      }
    }

#pragma unroll
    for (int kk = 0; kk < COLS / 16; ++kk) {
      const unsigned a[4] = {pack<T>(s[2 * kk][0], s[2 * kk][1]), pack<T>(s[2 * kk][2], s[2 * kk][3]),
                             pack<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        unsigned bfr[4];
        emu::ldmatrix_x4_trans(bfr, vs + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * LDS + dp * 16 + (lane >> 4) * 8);
        const unsigned b0[2] = {bfr[0], bfr[1]}, b1[2] = {bfr[2], bfr[3]};
        mma(o[2 * dp], a, b0, Q);
        mma(o[2 * dp + 1], a, b1, Q);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 1);
    l[r] += __shfl_xor_sync(FULL_MASK, l[r], 2);
    const long long row = q0 + warp * 16 + g + 8 * r;
    if (row >= p.len) continue;
    const float inv = 1.0f / l[r];
#pragma unroll
    for (int i = 0; i < DT; ++i)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int d = i * 8 + 2 * t + c;
        if (d < dim) O[row * p.o[2] + d] = from_f32<T>(o[i][2 * r + c] * inv);
      }
    if (t == 0) lse[row] = m[r] + logf(l[r]);
  }
}
}  // namespace attn_tc

#define ATTENTION_FORWARD_SIMT(dt, T, DMAX)                                                          \
  extern "C" __global__ void __launch_bounds__(256) attention_forward_##dt##_d##DMAX(                \
      const T* q, const T* k, const T* v, T* o, float* lse, AttentionParams p) {                     \
    attn::forward<T, DMAX>(q, k, v, o, lse, p);                                                      \
  }
#define ATTENTION_FORWARD_MMA(dt, T, DMAX)                                                           \
  extern "C" __global__ void __launch_bounds__(128) attention_forward_mma_##dt##_d##DMAX(            \
      const T* q, const T* k, const T* v, T* o, float* lse, AttentionParams p) {                     \
    attn_tc::forward<T, DMAX>(q, k, v, o, lse, p);                                                   \
  }
#define ATTENTION_BACKWARD(dt, T, DMAX)                                                                                \
  extern "C" __global__ void __launch_bounds__(256) attention_backward_dq_##dt##_d##DMAX(                              \
      const T* q, const T* k, const T* v, const T* g, const float* lse, const float* dvec, T* dq, AttentionParams p) { \
    attn::backward<T, DMAX, false>(q, k, v, g, lse, dvec, dq, nullptr, p);                                           \
  }                                                                                                                    \
  extern "C" __global__ void __launch_bounds__(256) attention_backward_dkv_##dt##_d##DMAX(                             \
      const T* q, const T* k, const T* v, const T* g, const float* lse, const float* dvec, T* dk, T* dv,               \
      AttentionParams p) {                                                                                             \
    attn::backward<T, DMAX, true>(q, k, v, g, lse, dvec, dk, dv, p);                                                   \
  }
#define ATTENTION_BACKWARD_ALL(dt, T)                                                                                   \
  ATTENTION_BACKWARD(dt, T, 64)                                                                                         \
  ATTENTION_BACKWARD(dt, T, 128)                                                                                        \
  extern "C" __global__ void __launch_bounds__(256) attention_backward_dot_##dt(const T* o, const T* g, float* dvec,    \
                                                                                AttentionParams p, long long rows) {    \
    attn::backward_dot<T>(o, g, dvec, p, rows);                                                                        \
  }
ATTENTION_FORWARD_SIMT(f32, float, 64)
ATTENTION_FORWARD_SIMT(f32, float, 128)
ATTENTION_FORWARD_MMA(f16, f16, 64)
ATTENTION_FORWARD_MMA(f16, f16, 128)
ATTENTION_FORWARD_MMA(bf16, bf16, 64)
ATTENTION_FORWARD_MMA(bf16, bf16, 128)
ATTENTION_BACKWARD_ALL(f32, float)
ATTENTION_BACKWARD_ALL(f16, f16)
ATTENTION_BACKWARD_ALL(bf16, bf16)
