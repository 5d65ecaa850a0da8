// Matrix multiplication: D = alpha * op(A) @ op(B) + beta * C, batched, with broadcast batch dims.
//
// Operands are described by their storage, never copied here: an operand whose last dimension has
// stride 1 is "n" (row-major, leading dimension = row stride); one whose second-to-last dimension
// has stride 1 is "t" (a transposed view, leading dimension = column stride). Entry points are
// gemm_<dtype>_<a><b>, e.g. gemm_bf16_nt for x @ w.t() with w stored [out, in]. D is a dense
// [batch, M, N] tensor. C is read through arbitrary strides (0 = broadcast), and only when
// beta != 0 (BLAS semantics: C may hold NaN when beta == 0).
//
// f32 (SIMT): 128x128x8 block tile, 256 threads with 8x8 outputs each, the next k-tile staged in
// registers while the current one is computed from shared memory (double buffer, one barrier per
// k-tile), float4 global loads where aligned, float4 shared-memory reads of the fragments.
//
// bf16/f16 (tensor cores): mma.sync m16n8k16 with f32 accumulation; 128x128x32 block tile, 8 warps
// of 64x32 (16 mma per warp per k16 step, for 6 ldmatrix.x4); a 4-stage cp.async pipeline in
// dynamic shared memory (up to 80 KB, so two blocks fit per SM on A100 and H100); rows padded by
// 16 bytes so the 8 rows of every ldmatrix phase fall in distinct bank groups; grouped block order
// for L2 reuse. Operands stored the "other" way round are read with ldmatrix.trans, so all four
// transpose combinations run at the same speed. Edges: out-of-range 16-byte chunks are zero-filled
// (cp.async src_bytes), so partial tiles add zeros; stores are predicated. A chunk whose global
// address is not 16-byte aligned (a row stride or view offset that is not a multiple of 8
// elements) is loaded with scalar loads and stored to shared memory directly; the pipeline's
// barriers order those stores like the asynchronous copies.
#include "common.cuh"

#define GEMM_MAX_BATCH 6

// Mirrors `GemmParams` in src/ops/matmul/gpu.rs. All strides are in elements.
struct GemmParams {
  long long M, N, K;
  long long lda, ldb;      // leading dimension of A and B as stored
  long long ldc_m, ldc_n;  // strides of C along M and N (0 where broadcast)
  long long batch_rank;    // dimensions of the broadcast batch shape
  long long batch_shape[GEMM_MAX_BATCH];
  long long batch_a[GEMM_MAX_BATCH], batch_b[GEMM_MAX_BATCH], batch_c[GEMM_MAX_BATCH];
  long long z0;            // first batch index of this launch (grid.z is limited to 65535)
  float alpha, beta;
};
EMU_ABI_LAYOUT(GemmParams, M, N, K, lda, ldb, ldc_m, ldc_n, batch_rank, batch_shape, batch_a, batch_b, batch_c, z0,
               alpha, beta);

struct BatchOffsets {
  long long a, b, c, d;
};

// Offsets of batch entry z (row-major over the broadcast batch shape) in each operand.
__device__ __forceinline__ BatchOffsets batch_offsets(const GemmParams& p, long long z) {
  BatchOffsets o{0, 0, 0, z * p.M * p.N};
  for (int k = int(p.batch_rank) - 1; k >= 0; --k) {
    const long long i = z % p.batch_shape[k];
    z /= p.batch_shape[k];
    o.a += i * p.batch_a[k];
    o.b += i * p.batch_b[k];
    o.c += i * p.batch_c[k];
  }
  return o;
}

// The operands moved to this block's batch entry (blockIdx.z).
template <class PA, class PC, class PD>
__device__ __forceinline__ void seek_batch(const GemmParams& p, PA& A, PA& B, PC& C, PD& D) {
  const BatchOffsets off = batch_offsets(p, (long long)blockIdx.z + p.z0);
  A += off.a;
  B += off.b;
  C += off.c;
  D += off.d;
}

// First row and column of BM x BN output tile `id` of a batch entry. Tiles are numbered in groups
// of GROUP_M tile rows: consecutive blocks share the same B columns and a few A rows, so large
// problems stay L2-resident.
template <int BM, int BN>
__device__ __forceinline__ void tile_origin(const GemmParams& p, long long id, long long& m0, long long& n0) {
  const long long GROUP_M = 8;
  const long long tiles_m = (p.M + BM - 1) / BM, tiles_n = (p.N + BN - 1) / BN;
  const long long per_group = GROUP_M * tiles_n;
  const long long first_m = (id / per_group) * GROUP_M;
  const long long rows = min(tiles_m - first_m, GROUP_M);
  const long long in_group = id % per_group;
  m0 = (first_m + in_group % rows) * BM;
  n0 = (in_group / rows) * BN;
}

// alpha * acc + beta * C[r, c]; C is not read when beta == 0.
template <class T>
__device__ __forceinline__ float epilogue(const GemmParams& p, const T* C, float acc, long long r, long long c) {
  float v = p.alpha * acc;
  if (p.beta != 0.0f) v += p.beta * to_f32(C[r * p.ldc_m + c * p.ldc_n]);
  return v;
}

// Tensor-core kernels: 8 consecutive elements src[offset .. offset + 8) into dst, of which `valid` are inside the
// matrix (the rest, and everything when valid <= 0, becomes zero).
template <class T>
__device__ __forceinline__ void load_chunk(T* dst, const T* src, long long offset, long long valid) {
  if (valid <= 0) {
    uint4 z;
    z.x = z.y = z.z = z.w = 0u;
    *reinterpret_cast<uint4*>(dst) = z;
    return;
  }
  const T* s = src + offset;
  const int n = valid < 8 ? int(valid) : 8;
  if ((reinterpret_cast<unsigned long long>(s) & 15) == 0) {
    emu::cp_async_16(dst, s, unsigned(n) * 2u);
  } else {
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i].bits = i < n ? s[i].bits : (unsigned short)0;
  }
}

// Tensor-core kernels: output elements (r, c) and (r, c + 1) from their accumulators. The pair goes
// out as one 32-bit store when N is even (then it is 4-byte aligned).
template <class T>
__device__ __forceinline__ void store_pair(const GemmParams& p, const T* C, T* D, long long r, long long c, float acc0,
                                           float acc1) {
  if (r >= p.M || c >= p.N) return;
  const T v0 = from_f32<T>(epilogue(p, C, acc0, r, c));
  if (c + 1 >= p.N) {
    D[r * p.N + c] = v0;
    return;
  }
  const T v1 = from_f32<T>(epilogue(p, C, acc1, r, c + 1));
  if ((p.N & 1) == 0) {
    *reinterpret_cast<unsigned*>(D + r * p.N + c) = unsigned(v0.bits) | (unsigned(v1.bits) << 16);
  } else {
    D[r * p.N + c] = v0;
    D[r * p.N + c + 1] = v1;
  }
}

// ================================================================ f32: SIMT
namespace sgemm {
constexpr int BM = 128, BN = 128, BK = 8, PAD = 4;
constexpr int LD = BM + PAD;  // shared row length; 528 bytes keeps float4 alignment
typedef float Tile[BK][LD];   // k-major: row k holds 128 consecutive m (or n)

// This thread's 4 elements of a 128 x BK tile of an operand, into registers. K_CONTIGUOUS: the
// operand is stored with k contiguous ([rows][K], leading dimension ld); otherwise [K][rows].
// `rows` is the extent of the 128-wide dimension (M for A, N for B). The 4 elements are contiguous
// in memory and read as one float4 when aligned and in bounds.
template <bool K_CONTIGUOUS>
__device__ __forceinline__ void load_tile(const float* src, long long ld, long long r0, long long rows, long long k0,
                                          long long K, float (&v)[4]) {
  const int tid = threadIdx.x;
  long long r, k;
  if (K_CONTIGUOUS) {  // two threads per row, 4 k each
    r = r0 + (tid >> 1);
    k = k0 + (tid & 1) * 4;
  } else {  // 32 threads per k, 4 rows each
    k = k0 + (tid >> 5);
    r = r0 + (tid & 31) * 4;
  }
  const bool outer_ok = K_CONTIGUOUS ? r < rows : k < K;
  const long long inner = K_CONTIGUOUS ? K - k : rows - r;  // valid elements from this position on
  if (!outer_ok || inner <= 0) {
    v[0] = v[1] = v[2] = v[3] = 0.0f;
    return;
  }
  const float* ptr = K_CONTIGUOUS ? src + r * ld + k : src + k * ld + r;
  if (inner >= 4 && (reinterpret_cast<unsigned long long>(ptr) & 15) == 0) {
    const float4 q = *reinterpret_cast<const float4*>(ptr);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = i < inner ? ptr[i] : 0.0f;
  }
}

template <bool K_CONTIGUOUS>
__device__ __forceinline__ void store_tile(Tile& s, const float (&v)[4]) {
  const int tid = threadIdx.x;
  if (K_CONTIGUOUS) {
    const int r = tid >> 1, k = (tid & 1) * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) s[k + i][r] = v[i];
  } else {
    const int k = tid >> 5, r = (tid & 31) * 4;
    float4 q;
    q.x = v[0], q.y = v[1], q.z = v[2], q.w = v[3];
    *reinterpret_cast<float4*>(&s[k][r]) = q;
  }
}

// Thread (tx, ty) of the 16x16 grid owns rows {4ty..4ty+3, 64+4ty..64+4ty+3} and the same pattern
// of columns with tx: two float4 reads per operand per k, at most two distinct addresses per
// quarter-warp for A and conflict-free for B.
template <bool TA, bool TB>
__device__ void gemm(const float* __restrict__ A, const float* __restrict__ B, const float* C, float* __restrict__ D,
                     const GemmParams& p) {
  EMU_SHARED(float4, a_raw, [2 * BK * LD / 4]);
  EMU_SHARED(float4, b_raw, [2 * BK * LD / 4]);
  Tile* As = reinterpret_cast<Tile*>(&a_raw[0]);
  Tile* Bs = reinterpret_cast<Tile*>(&b_raw[0]);

  seek_batch(p, A, B, C, D);
  long long m0, n0;
  tile_origin<BM, BN>(p, blockIdx.x, m0, n0);
  const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;

  float acc[8][8];
#pragma unroll
  for (int i = 0; i < 8; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

  const long long ktiles = (p.K + BK - 1) / BK;
  float ra[4], rb[4];
  load_tile<!TA>(A, p.lda, m0, p.M, 0, p.K, ra);
  load_tile<TB>(B, p.ldb, n0, p.N, 0, p.K, rb);
  store_tile<!TA>(As[0], ra);
  store_tile<TB>(Bs[0], rb);
  __syncthreads();

  for (long long kt = 0; kt < ktiles; ++kt) {
    const int cur = int(kt & 1);
    const bool more = kt + 1 < ktiles;
    if (more) {  // global loads in flight while this tile is computed
      load_tile<!TA>(A, p.lda, m0, p.M, (kt + 1) * BK, p.K, ra);
      load_tile<TB>(B, p.ldb, n0, p.N, (kt + 1) * BK, p.K, rb);
    }
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      float a[8], b[8];
      const float4 a0 = *reinterpret_cast<const float4*>(&As[cur][k][4 * ty]);
      const float4 a1 = *reinterpret_cast<const float4*>(&As[cur][k][64 + 4 * ty]);
      const float4 b0 = *reinterpret_cast<const float4*>(&Bs[cur][k][4 * tx]);
      const float4 b1 = *reinterpret_cast<const float4*>(&Bs[cur][k][64 + 4 * tx]);
      a[0] = a0.x, a[1] = a0.y, a[2] = a0.z, a[3] = a0.w, a[4] = a1.x, a[5] = a1.y, a[6] = a1.z, a[7] = a1.w;
      b[0] = b0.x, b[1] = b0.y, b[2] = b0.z, b[3] = b0.w, b[4] = b1.x, b[5] = b1.y, b[6] = b1.z, b[7] = b1.w;
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    if (more) {  // the other buffer was last read before the previous barrier
      store_tile<!TA>(As[cur ^ 1], ra);
      store_tile<TB>(Bs[cur ^ 1], rb);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const long long r = m0 + (i < 4 ? 4 * ty + i : 64 + 4 * ty + i - 4);
    if (r >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const long long c = n0 + (j < 4 ? 4 * tx + j : 64 + 4 * tx + j - 4);
      if (c < p.N) D[r * p.N + c] = epilogue(p, C, acc[i][j], r, c);
    }
  }
}
}  // namespace sgemm

#define GEMM_F32(ab, TA, TB)                                                                                  \
  extern "C" __global__ void __launch_bounds__(256) gemm_f32_##ab(const float* A, const float* B, const float* C, \
                                                                  float* D, GemmParams p) {                   \
    sgemm::gemm<TA, TB>(A, B, C, D, p);                                                                       \
  }
GEMM_F32(nn, false, false)
GEMM_F32(nt, false, true)
GEMM_F32(tn, true, false)
GEMM_F32(tt, true, true)

// ================================================================ bf16 / f16: tensor cores
namespace tc {
constexpr int BM = 128, BN = 128, BK = 32, THREADS = 256, STAGES = 4, PAD = 8;
static_assert((STAGES & (STAGES - 1)) == 0, "stage indices are taken with a mask");
// Shared tile of one operand for one stage. K_CONTIGUOUS ([rows][K] storage): 128 rows of BK + PAD
// elements (80 bytes: 8 consecutive rows hit 8 distinct 16-byte bank groups). Otherwise ([K][rows]
// storage): BK rows of 128 + PAD elements (272 bytes, same property).
constexpr int ROW_K = BK + PAD, ROW_MN = BM + PAD;
__host__ __device__ constexpr int tile_elems(bool k_contiguous) { return k_contiguous ? BM * ROW_K : BK * ROW_MN; }

__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const bf16*) {
  emu::mma_m16n8k16_bf16(d, a, b, d);
}
__device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const f16*) {
  emu::mma_m16n8k16_f16(d, a, b, d);
}

// One stage of one operand: 512 chunks of 8 elements, two per thread.
template <bool K_CONTIGUOUS, class T>
__device__ __forceinline__ void load_operand(T* s, const T* g, long long ld, long long r0, long long rows,
                                             long long k0, long long K) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int c = threadIdx.x + i * THREADS;
    if (K_CONTIGUOUS) {  // 128 rows x 32 k: 4 chunks per row
      const int r = c >> 2, kc = (c & 3) * 8;
      const long long gr = r0 + r, gk = k0 + kc;
      load_chunk(s + r * ROW_K + kc, g, gr * ld + gk, gr < rows ? K - gk : 0);
    } else {  // 32 k x 128 rows: 16 chunks per k
      const int k = c >> 4, rc = (c & 15) * 8;
      const long long gk = k0 + k, gr = r0 + rc;
      load_chunk(s + k * ROW_MN + rc, g, gk * ld + gr, gk < K ? rows - gr : 0);
    }
  }
}

// A fragment (16x16, rows m0.., k k0..) of the mma. Stored [m][k]: plain ldmatrix, lane supplies
// row m0 + lane%16 at k0 + 8*(lane/16). Stored [k][m]: ldmatrix.trans of the 8x8 blocks
// (m 0-7|8-15) x (k 0-7|8-15) in the register order a0..a3 (m-half = j&1, k-half = j>>1).
template <bool K_CONTIGUOUS, class T>
__device__ __forceinline__ void load_a(unsigned (&a)[4], const T* s, int m0, int k0, int lane) {
  if (K_CONTIGUOUS) {
    emu::ldmatrix_x4(a, s + (m0 + (lane & 15)) * ROW_K + k0 + (lane >> 4) * 8);
  } else {
    const int j = lane >> 3, r = lane & 7;
    emu::ldmatrix_x4_trans(a, s + (k0 + (j >> 1) * 8 + r) * ROW_MN + m0 + (j & 1) * 8);
  }
}

// B fragments of two n8 tiles (n0.. and n0+8..) for k k0..k0+15: b[0..1] and b[2..3]. Stored [k][n]:
// ldmatrix.trans (k-half = (lane/8)&1, n-half = lane/16). Stored [n][k]: plain ldmatrix of the
// blocks (n-half = j>>1, k-half = j&1).
template <bool K_CONTIGUOUS, class T>
__device__ __forceinline__ void load_b(unsigned (&b)[4], const T* s, int n0, int k0, int lane) {
  if (K_CONTIGUOUS) {
    const int j = lane >> 3, r = lane & 7;
    emu::ldmatrix_x4(b, s + (n0 + (j >> 1) * 8 + r) * ROW_K + k0 + (j & 1) * 8);
  } else {
    emu::ldmatrix_x4_trans(b, s + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * ROW_MN + n0 + (lane >> 4) * 8);
  }
}

template <class T, bool TA, bool TB>
__device__ __forceinline__ void load_stage(T* sA, T* sB, const T* A, const T* B, const GemmParams& p, long long m0,
                                           long long n0, long long kt) {
  load_operand<!TA>(sA, A, p.lda, m0, p.M, kt * BK, p.K);
  load_operand<TB>(sB, B, p.ldb, n0, p.N, kt * BK, p.K);
}

template <class T, bool TA, bool TB>
__device__ void gemm(const T* __restrict__ A, const T* __restrict__ B, const T* C, T* __restrict__ D,
                     const GemmParams& p) {
  // One declaration type for every instance: the device side is a single extern array.
  EMU_DYNAMIC_SHARED(uint4, smem);
  constexpr int A_ELEMS = tile_elems(!TA), B_ELEMS = tile_elems(TB);
  T* sA = reinterpret_cast<T*>(smem);
  T* sB = sA + STAGES * A_ELEMS;

  seek_batch(p, A, B, C, D);
  long long m0, n0;
  tile_origin<BM, BN>(p, blockIdx.x, m0, n0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int wm = (warp >> 2) * 64, wn = (warp & 3) * 32;  // this warp's 64x32 piece of the tile

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  const long long ktiles = (p.K + BK - 1) / BK;
  // Prologue: STAGES - 1 tiles in flight. Every iteration commits one group (empty ones at the
  // end), so wait<STAGES - 2> always means "tile kt has landed".
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_stage<T, TA, TB>(sA + s * A_ELEMS, sB + s * B_ELEMS, A, B, p, m0, n0, s);
    emu::cp_async_commit();
  }
  for (long long kt = 0; kt < ktiles; ++kt) {
    emu::cp_async_wait<STAGES - 2>();
    // Tile kt is visible to all threads, and all threads are done with iteration kt - 1, whose
    // stage the prefetch below overwrites.
    __syncthreads();
    const long long pf = kt + STAGES - 1;
    if (pf < ktiles) {
      const int ps = int(pf & (STAGES - 1));
      load_stage<T, TA, TB>(sA + ps * A_ELEMS, sB + ps * B_ELEMS, A, B, p, m0, n0, pf);
    }
    emu::cp_async_commit();

    const int st = int(kt & (STAGES - 1));
    const T* a_s = sA + st * A_ELEMS;
    const T* b_s = sB + st * B_ELEMS;
#pragma unroll
    for (int ks = 0; ks < BK; ks += 16) {
      unsigned af[4][4], bf[2][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) load_a<!TA>(af[mi], a_s, wm + mi * 16, ks, lane);
#pragma unroll
      for (int np = 0; np < 2; ++np) load_b<TB>(bf[np], b_s, wn + np * 16, ks, lane);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          const unsigned b2[2] = {bf[ni >> 1][(ni & 1) * 2], bf[ni >> 1][(ni & 1) * 2 + 1]};
          mma(acc[mi][ni], af[mi], b2, A);
        }
    }
  }
  emu::cp_async_wait<0>();

  // Accumulator element e of tile (mi, ni): row g + 8*(e/2), column 2t + e%2.
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
        store_pair(p, C, D, m0 + wm + mi * 16 + g + 8 * h, n0 + wn + ni * 8 + 2 * t, acc[mi][ni][2 * h],
                   acc[mi][ni][2 * h + 1]);
}
}  // namespace tc

// (256, 2): at most 128 registers per thread, so two blocks (16 warps) share an SM and one block's
// epilogue and prologue overlap the other's main loop. ptxas needs no spills for it.
#define GEMM_TC(dt, T, ab, TA, TB)                                                                             \
  extern "C" __global__ void __launch_bounds__(256, 2) gemm_##dt##_##ab(const T* A, const T* B, const T* C, T* D, \
                                                                     GemmParams p) {                           \
    tc::gemm<T, TA, TB>(A, B, C, D, p);                                                                        \
  }
#define GEMM_TC_ALL(dt, T)         \
  GEMM_TC(dt, T, nn, false, false) \
  GEMM_TC(dt, T, nt, false, true)  \
  GEMM_TC(dt, T, tn, true, false)  \
  GEMM_TC(dt, T, tt, true, true)
GEMM_TC_ALL(bf16, bf16)
GEMM_TC_ALL(f16, f16)

// ================================================================ bf16 / f16 on Hopper: wgmma
// sm_90a only (the host launches these on compute capability 9.0). 128x256x64 block tile; two
// consumer warpgroups of 64x256, each k16 step one wgmma.m64n256k16 per warpgroup reading both
// operands from shared memory; one wgmma group in flight. Tiles are stored in the 128-byte-swizzled
// layouts wgmma reads directly, so all four transpose combinations need no transposing copy: a
// K-major operand ([rows][K] storage) as 128-byte rows of 64 k, 8 rows to a 1024-byte atom; an
// MN-major one ([K][rows] storage) as blocks of 64 rows, each 64 k of 128 bytes (8 KB). 4 stages of
// 48 KB, 193 KB of dynamic shared memory: one block per SM. K >= 1 (the host sends K = 0 to tc::):
// with a path that skips the main loop, ptxas serialises the wgmmas.
//
// Two ways to fill the stages:
//   gemm_tma_*    persistent; a producer warpgroup whose first thread loads each stage with the
//                 tensor memory accelerator (TMA boxes that land swizzled, edges zero-filled) and
//                 full/empty mbarriers per stage; needs 16-byte-aligned operands and at most one
//                 batch dimension (the host's tensor maps);
//   gemm_wgmma_*  the consumers themselves, by cp.async (edges and misalignment as in tc::), two
//                 stages in flight, a barrier per k-tile; any operand.
#ifdef HAS_WGMMA
namespace wg {
constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4;
static_assert((STAGES & (STAGES - 1)) == 0, "stage indices are taken with a mask");
constexpr unsigned A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
constexpr unsigned MN_BLOCK_BYTES = 64 * BK * 2;  // 64 rows x BK of an MN-major tile

// Byte offset of the 16-byte chunk holding (row r, k) of a tile (r a multiple of 8 when MN-major, k
// a multiple of 8 when K-major). Swizzle: chunk bits 4-6 ^= row-in-atom bits 7-9, on offsets from
// a 1024-byte-aligned tile, as the hardware applies it to shared addresses.
template <bool K_MAJOR>
__device__ __forceinline__ unsigned chunk_offset(unsigned r, unsigned k) {
  const unsigned off = K_MAJOR ? r * 128 + k * 2 : (r / 64) * MN_BLOCK_BYTES + k * 128 + (r % 64) * 2;
  return off ^ (((off >> 7) & 7) << 4);
}

// Matrix descriptor (PTX ISA): start address, leading and stride byte offsets (all >> 4), 128-byte
// swizzle. K-major: SBO steps 8 rows (1024 bytes); LBO is unused. MN-major: LBO steps 64 rows (one
// block), SBO steps 8 k (1024 bytes).
template <bool K_MAJOR>
__device__ __forceinline__ unsigned long long descriptor(unsigned addr) {
  const unsigned lbo = K_MAJOR ? 16 : MN_BLOCK_BYTES, sbo = 1024;
  return (unsigned long long)((addr >> 4) & 0x3FFF) | (unsigned long long)(lbo >> 4) << 16 |
         (unsigned long long)(sbo >> 4) << 32 | 1ull << 62;
}

// Shared address of the wgmma operand at rows r0.. (A: the warpgroup's 64; B: all 256), k16 step ks.
template <bool K_MAJOR>
__device__ __forceinline__ unsigned operand_addr(unsigned tile, unsigned r0, int ks) {
  return tile + (K_MAJOR ? r0 * 128 + ks * 32 : (r0 / 64) * MN_BLOCK_BYTES + ks * 16 * 128);
}

template <bool TA, bool TB>
__device__ __forceinline__ void wgmma(float (&d)[128], unsigned long long da, unsigned long long db, const bf16*) {
  emu::wgmma_m64n256k16_bf16<TA, !TB>(d, da, db);
}
template <bool TA, bool TB>
__device__ __forceinline__ void wgmma(float (&d)[128], unsigned long long da, unsigned long long db, const f16*) {
  emu::wgmma_m64n256k16_f16<TA, !TB>(d, da, db);
}

// The 1024-byte-aligned start of the stages; the launch adds 1 KB of dynamic shared memory for it.
__device__ __forceinline__ unsigned char* aligned_tiles() {
  EMU_DYNAMIC_SHARED(uint4, smem);
  unsigned char* raw = reinterpret_cast<unsigned char*>(smem);
  return raw + ((1024u - (emu::smem_u32(raw) & 1023u)) & 1023u);
}

// One k-tile of a consumer warpgroup: 4 wgmmas on the stage at shared address a_tile, committed;
// returns with the previous k-tile's group retired.
template <class T, bool TA, bool TB>
__device__ __forceinline__ void mma_stage(float (&acc)[128], unsigned a_tile, unsigned group) {
  constexpr bool A_K_MAJOR = !TA, B_K_MAJOR = TB;
  emu::wgmma_fence_operands(acc);
  emu::wgmma_fence();
#pragma unroll
  for (int ks = 0; ks < BK / 16; ++ks) {
    wgmma<TA, TB>(acc, descriptor<A_K_MAJOR>(operand_addr<A_K_MAJOR>(a_tile, 64 * group, ks)),
                  descriptor<B_K_MAJOR>(operand_addr<B_K_MAJOR>(a_tile + A_BYTES, 0, ks)), (const T*)nullptr);
  }
  emu::wgmma_commit();
  emu::wgmma_wait<1>();
  emu::wgmma_fence_operands(acc);
}

// The consumer warpgroup's 64 x 256 piece of the block tile, rows from r0. Accumulator fragment of
// wgmma .m64nNk16: acc[i] is row 16 * warp + lane / 4 + 8 * ((i / 2) % 2) of the warpgroup's 64,
// column 8 * (i / 4) + 2 * (lane % 4) + i % 2.
template <class T>
__device__ __forceinline__ void store_tile(const float (&acc)[128], const GemmParams& p, const T* C, T* D,
                                           long long r0, long long n0) {
  const unsigned warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const long long r = r0 + 16 * warp + lane / 4;
#pragma unroll
  for (int i = 0; i < 128; i += 2)
    store_pair(p, C, D, r + 8 * ((i / 2) % 2), n0 + 8 * (i / 4) + 2 * (lane % 4), acc[i], acc[i + 1]);
}

// ---- cp.async
constexpr int CP_THREADS = 256, IN_FLIGHT = 2;
static_assert(IN_FLIGHT + 2 <= STAGES, "the refilled stage must have been retired a k-tile ago");

// One stage of one operand, ROWS x BK: ROWS * 8 chunks, ROWS / 32 per thread, consecutive threads
// on consecutive 16 bytes of global memory. Chunk i of a thread lies i * CHUNK_STEP bytes further
// into the tile (with the same swizzle: CHUNK_STEP keeps bits 7-9) and STEP * i rows further in
// global memory (rows of the operand when K-major, k when MN-major). `interior`: the stage lies
// inside the matrix and every chunk is 16-byte aligned, so no chunk needs a bounds check.
template <bool K_MAJOR, int ROWS, class T>
__device__ __forceinline__ void load_operand(unsigned char* tile, const T* g, long long ld, long long r0,
                                             long long rows, long long k0, long long K, bool interior) {
  constexpr unsigned STEP = K_MAJOR ? CP_THREADS / 8 : CP_THREADS / (ROWS / 8);
  constexpr unsigned CHUNK_STEP = STEP * 128;
  const unsigned c = threadIdx.x;
  const unsigned r = K_MAJOR ? c / 8 : (c % (ROWS / 8)) * 8, k = K_MAJOR ? (c % 8) * 8 : c / (ROWS / 8);
  unsigned char* dst = tile + chunk_offset<K_MAJOR>(r, k);
  const long long outer = K_MAJOR ? r0 + r : k0 + k, inner = K_MAJOR ? k0 + k : r0 + r;
  const long long outer_end = K_MAJOR ? rows : K, inner_end = K_MAJOR ? K : rows;
#pragma unroll
  for (int i = 0; i < ROWS / 32; ++i) {
    T* d = reinterpret_cast<T*>(dst + CHUNK_STEP * i);
    const long long o = outer + i * STEP;
    if (interior) {
      emu::cp_async_16(d, g + o * ld + inner);
    } else {
      load_chunk(d, g, o * ld + inner, o < outer_end ? inner_end - inner : 0);
    }
  }
}

template <class T, bool TA, bool TB>
__device__ void gemm_cp_async(const T* __restrict__ A, const T* __restrict__ B, const T* C, T* __restrict__ D,
                              const GemmParams& p) {
  constexpr bool A_K_MAJOR = !TA, B_K_MAJOR = TB;
  unsigned char* tiles = aligned_tiles();
  const unsigned tiles_addr = emu::smem_u32(tiles);

  seek_batch(p, A, B, C, D);
  long long m0, n0;
  tile_origin<BM, BN>(p, blockIdx.x, m0, n0);
  const unsigned group = threadIdx.x / 128;  // this warpgroup's rows: 64 * group ..

  const auto aligned = [](const T* g, long long ld) {
    return (reinterpret_cast<unsigned long long>(g) & 15) == 0 && ld % 8 == 0;
  };
  const bool a_inside = aligned(A, p.lda) && m0 + BM <= p.M, b_inside = aligned(B, p.ldb) && n0 + BN <= p.N;
  auto load_stage = [&](long long kt) {
    unsigned char* a = tiles + unsigned(kt & (STAGES - 1)) * STAGE_BYTES;
    const long long k0 = kt * BK;
    const bool k_inside = k0 + BK <= p.K;
    load_operand<A_K_MAJOR, BM>(a, A, p.lda, m0, p.M, k0, p.K, a_inside && k_inside);
    load_operand<B_K_MAJOR, BN>(a + A_BYTES, B, p.ldb, n0, p.N, k0, p.K, b_inside && k_inside);
  };

  float acc[128];
#pragma unroll
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;

  const long long ktiles = (p.K + BK - 1) / BK;
#pragma unroll
  for (int s = 0; s < IN_FLIGHT; ++s) {
    if (s < ktiles) load_stage(s);
    emu::cp_async_commit();
  }
  long long kt = 0;
  do {
    emu::cp_async_wait<IN_FLIGHT - 1>();
    // This thread's part of tile kt, loaded through the generic proxy, becomes visible to the
    // tensor cores (async proxy); the barrier then publishes every thread's part. It also orders
    // every warpgroup's retirement of tile kt - 2 (in mma_stage) before its stage is refilled.
    emu::fence_proxy_async();
    __syncthreads();
    if (kt + IN_FLIGHT < ktiles) load_stage(kt + IN_FLIGHT);
    emu::cp_async_commit();
    mma_stage<T, TA, TB>(acc, tiles_addr + unsigned(kt & (STAGES - 1)) * STAGE_BYTES, group);
  } while (++kt < ktiles);
  emu::wgmma_wait<0>();
  emu::wgmma_fence_operands(acc);
  emu::cp_async_wait<0>();
  store_tile(acc, p, C, D, m0 + 64 * group, n0);
}

// ---- TMA
// 384 threads: warpgroup 0 produces (its first thread issues every load), warpgroups 1 and 2
// consume. Per stage, `full` completes when the producer has armed it and the stage's bytes have
// landed, and `empty` when the 8 consumer warps have retired their wgmmas on it. The mbarriers
// follow the stages in shared memory (64 more bytes). Persistent: a grid of at most one block per
// SM walks the output tiles of every batch entry, and the stage ring runs on across tiles, so the
// producer loads the next tile while the consumers store this one.

// The TMA boxes of one operand's stage: K-major, one box of 64 k x ROWS rows; MN-major, a box of
// 64 rows x 64 k for each 64-row block that starts inside the matrix (`rows`): blocks wholly outside
// are skipped, as their products only reach outputs that are never stored. Coordinates are
// innermost first; z selects the batch entry. Returns the bytes the boxes bring.
template <bool K_MAJOR, int ROWS>
__device__ __forceinline__ unsigned stage_bytes(long long r0, long long rows) {
  if (K_MAJOR) return ROWS * BK * 2;
  const long long blocks = (rows - r0 + 63) / 64;
  return unsigned(blocks < ROWS / 64 ? blocks : ROWS / 64) * MN_BLOCK_BYTES;
}
template <bool K_MAJOR, int ROWS>
__device__ __forceinline__ void load_tma(unsigned char* tile, const TensorMap& map, long long r0, long long rows,
                                         long long k0, int z, unsigned long long* bar) {
  if (K_MAJOR) {
    emu::tma_load_3d(tile, &map, int(k0), int(r0), z, bar);
  } else {
#pragma unroll
    for (int j = 0; j < ROWS / 64; ++j)
      if (r0 + 64 * j < rows) emu::tma_load_3d(tile + j * MN_BLOCK_BYTES, &map, int(r0 + 64 * j), int(k0), z, bar);
  }
}

template <class T, bool TA, bool TB>
__device__ void gemm_tma(const TensorMap& a_map, const TensorMap& b_map, const T* C, T* __restrict__ D,
                         const GemmParams& p) {
  unsigned char* tiles = aligned_tiles();
  unsigned long long* full = reinterpret_cast<unsigned long long*>(tiles + STAGES * STAGE_BYTES);
  unsigned long long* empty = full + STAGES;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      emu::mbarrier_init(&full[s], 1);
      emu::mbarrier_init(&empty[s], 8);
    }
    emu::fence_mbarrier_init();
  }
  __syncthreads();

  // the host allows one batch dimension at most
  const long long per_entry = ((p.M + BM - 1) / BM) * ((p.N + BN - 1) / BN);
  const long long output_tiles = per_entry * (p.batch_rank ? p.batch_shape[0] : 1);
  const long long ktiles = (p.K + BK - 1) / BK;
  // `it` counts k-tiles across this block's output tiles: stage it % STAGES, its use it / STAGES
  long long it = 0;

  if (threadIdx.x < 128) {
    // the producer needs few registers, the consumers' accumulators many
    emu::setmaxnreg_dec<40>();
    if (threadIdx.x == 0) {
      for (long long tile = blockIdx.x; tile < output_tiles; tile += gridDim.x) {
        const long long z = tile / per_entry;
        long long m0, n0;
        tile_origin<BM, BN>(p, tile % per_entry, m0, n0);
        // batch coordinates of the operands that are not broadcast
        const int za = int(p.batch_rank && p.batch_a[0] ? z : 0), zb = int(p.batch_rank && p.batch_b[0] ? z : 0);
        const unsigned bytes = stage_bytes<!TA, BM>(m0, p.M) + stage_bytes<TB, BN>(n0, p.N);
        for (long long kt = 0; kt < ktiles; ++kt, ++it) {
          const unsigned s = unsigned(it & (STAGES - 1));
          if (it >= STAGES) emu::mbarrier_wait(&empty[s], unsigned((it / STAGES - 1) & 1));
          emu::mbarrier_arrive_expect_tx(&full[s], bytes);
          unsigned char* a = tiles + s * STAGE_BYTES;
          load_tma<!TA, BM>(a, a_map, m0, p.M, kt * BK, za, &full[s]);
          load_tma<TB, BN>(a + A_BYTES, b_map, n0, p.N, kt * BK, zb, &full[s]);
        }
      }
    }
    return;
  }

  emu::setmaxnreg_inc<232>();
  const unsigned group = threadIdx.x / 128 - 1;
  const bool releases = threadIdx.x % 32 == 0;  // one arrival per consumer warp
  const unsigned tiles_addr = emu::smem_u32(tiles);
  float acc[128];
  for (long long tile = blockIdx.x; tile < output_tiles; tile += gridDim.x) {
#pragma unroll
    for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
    long long kt = 0;
    do {
      const unsigned s = unsigned(it & (STAGES - 1));
      emu::mbarrier_wait(&full[s], unsigned((it / STAGES) & 1));
      mma_stage<T, TA, TB>(acc, tiles_addr + s * STAGE_BYTES, group);
      // k-tile it - 1 is retired: its stage may be refilled
      if (kt > 0 && releases) emu::mbarrier_arrive(&empty[unsigned((it - 1) & (STAGES - 1))]);
      ++it;
    } while (++kt < ktiles);
    emu::wgmma_wait<0>();
    emu::wgmma_fence_operands(acc);
    if (releases) emu::mbarrier_arrive(&empty[unsigned((it - 1) & (STAGES - 1))]);
    long long m0, n0;
    tile_origin<BM, BN>(p, tile % per_entry, m0, n0);
    const BatchOffsets off = batch_offsets(p, tile / per_entry);
    store_tile(acc, p, C + off.c, D + off.d, m0 + 64 * group, n0);
  }
}
}  // namespace wg
#define GEMM_WGMMA_BODY(T, TA, TB) wg::gemm_cp_async<T, TA, TB>(A, B, C, D, p);
#define GEMM_TMA_BODY(T, TA, TB) wg::gemm_tma<T, TA, TB>(a_map, b_map, C, D, p);
#else
// launched only on sm_90a devices (src/ops/matmul/gpu.rs)
#define GEMM_WGMMA_BODY(T, TA, TB) __trap();
#define GEMM_TMA_BODY(T, TA, TB) __trap();
#endif

#define GEMM_WGMMA(dt, T, ab, TA, TB)                                                                        \
  extern "C" __global__ void __launch_bounds__(256, 1) gemm_wgmma_##dt##_##ab(const T* A, const T* B, const T* C, \
                                                                           T* D, GemmParams p) {          \
    GEMM_WGMMA_BODY(T, TA, TB)                                                                              \
  }                                                                                                         \
  extern "C" __global__ void __launch_bounds__(384, 1)                                                      \
      gemm_tma_##dt##_##ab(const __grid_constant__ TensorMap a_map, const __grid_constant__ TensorMap b_map, \
                           const T* C, T* D, GemmParams p) {                                                \
    GEMM_TMA_BODY(T, TA, TB)                                                                                \
  }
#define GEMM_WGMMA_ALL(dt, T)         \
  GEMM_WGMMA(dt, T, nn, false, false) \
  GEMM_WGMMA(dt, T, nt, false, true)  \
  GEMM_WGMMA(dt, T, tn, true, false)  \
  GEMM_WGMMA(dt, T, tt, true, true)
GEMM_WGMMA_ALL(bf16, bf16)
GEMM_WGMMA_ALL(f16, f16)
