// Self-test of the virtual GPU (tests/vgpu.rs). Two kinds of kernels:
//   vgpu_*      correct kernels with known answers, one per emulated feature;
//   vgpu_bug_*  deliberately broken kernels, one per bug class, that the emulator must catch.
// Like every kernel file it is also compiled by NVRTC for sm_80 and sm_90, so all of it is valid
// CUDA. The `// @name` markers let the tests find the source line an error must name.
#include "common.cuh"

// ---------------------------------------------------------------- correct kernels

// Warp shuffles. `cases` holds (kind, width, arg) triples; kind 0 idx, 1 xor, 2 down, 3 up,
// 4 idx on a double (an 8-byte payload). Lane values are 1000 * warp + lane + 1.
extern "C" __global__ void vgpu_shfl_i32(const int* cases, int ncases, int* out) {
  const int tid = threadIdx.x;
  const int v = 1000 * (tid >> 5) + (tid & 31) + 1;
  for (int c = 0; c < ncases; ++c) {
    const int kind = cases[3 * c], width = cases[3 * c + 1], arg = cases[3 * c + 2];
    int r;
    if (kind == 0) {
      r = __shfl_sync(FULL_MASK, v, arg, width);
    } else if (kind == 1) {
      r = __shfl_xor_sync(FULL_MASK, v, arg, width);
    } else if (kind == 2) {
      r = __shfl_down_sync(FULL_MASK, v, (unsigned)arg, width);
    } else if (kind == 3) {
      r = __shfl_up_sync(FULL_MASK, v, (unsigned)arg, width);
    } else {
      r = (int)(__shfl_sync(FULL_MASK, v + 0.25, arg, width) * 4.0);
    }
    out[c * blockDim.x + tid] = r;
  }
}

// Votes and __syncwarp. out[5 * tid + k]: full-warp ballot, all, any; a ballot over lanes 0-15
// only (0 on the other lanes); the value the next lane stored to shared memory before __syncwarp.
extern "C" __global__ void vgpu_vote_u32(const int* pred, unsigned* out) {
  EMU_SHARED(unsigned, s, [256]);
  const int tid = threadIdx.x, lane = tid & 31;
  const int p = pred[tid];
  out[5 * tid + 0] = __ballot_sync(FULL_MASK, p);
  out[5 * tid + 1] = __all_sync(FULL_MASK, p);
  out[5 * tid + 2] = __any_sync(FULL_MASK, p);
  out[5 * tid + 3] = lane < 16 ? __ballot_sync(0x0000ffffu, p) : 0u;
  s[tid] = 3 * tid + 1;
  __syncwarp();
  out[5 * tid + 4] = s[(tid & ~31) | ((lane + 1) & 31)];
}

// Atomics across blocks (and OS threads on the virtual GPU). With n threads in the grid:
// fsum = n, isum = n(n-1)/2, imax = n-1 (37 is coprime to n), ticket = n and `order` a
// permutation of 1..n (every ticket taken by exactly one thread through an atomicCAS loop).
extern "C" __global__ void vgpu_atomics_i32(float* fsum, int* isum, int* imax, int* ticket, int* order) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  const int n = gridDim.x * blockDim.x;
  atomicAdd(fsum, 1.0f);
  atomicAdd(isum, g);
  atomicMax(imax, (g * 37) % n);
  int old = atomicAdd(ticket, 0);
  for (;;) {
    const int prev = atomicCAS(ticket, old, old + 1);
    if (prev == old) break;
    old = prev;
  }
  order[old] = g + 1;
}

// Tree reduction of blockDim.x (a power of two, 32..256) values through shared memory `s`.
__device__ float block_sum(float* s, float v) {
  const int tid = threadIdx.x;
  s[tid] = v;
  __syncthreads();
  for (int h = blockDim.x / 2; h >= 32; h >>= 1) {
    if (tid < h) s[tid] += s[tid + h];
    __syncthreads();
  }
  float r = 0.f;
  if (tid < 32) r = warp_sum(s[tid]);
  return r;
}
extern "C" __global__ void vgpu_block_sum_f32(const float* x, float* out) {
  EMU_SHARED(float, s, [256]);
  const float r = block_sum(s, x[blockIdx.x * blockDim.x + threadIdx.x]);
  if (threadIdx.x == 0) out[blockIdx.x] = r;
}
extern "C" __global__ void vgpu_block_sum_dyn_f32(const float* x, float* out) {
  EMU_DYNAMIC_SHARED(float, s);  // blockDim.x floats
  const float r = block_sum(s, x[blockIdx.x * blockDim.x + threadIdx.x]);
  if (threadIdx.x == 0) out[blockIdx.x] = r;
}

__device__ __forceinline__ unsigned pack2(unsigned short lo, unsigned short hi) { return lo | (unsigned)hi << 16; }
__device__ __forceinline__ void mma_op(bf16, float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                       const float (&c)[4]) {
  emu::mma_m16n8k16_bf16(d, a, b, c);
}
__device__ __forceinline__ void mma_op(f16, float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                       const float (&c)[4]) {
  emu::mma_m16n8k16_f16(d, a, b, c);
}

// D = A B + C, one m16n8k16 tile per warp (warp w of the grid: A + 256w, 16x16 row-major; B + 128w,
// 16x8 stored k-major; C, D + 128w, 16x8 row-major). Fragments are built straight from the PTX
// ISA layout tables (g = lane / 4, t = lane % 4).
template <class T>
__device__ void mma_tile(const T* A, const T* B, const float* C, float* D) {
  const int lane = threadIdx.x & 31, w = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  A += 256 * w;
  B += 128 * w;
  C += 128 * w;
  D += 128 * w;
  const int g = lane >> 2, t = lane & 3;
  unsigned a[4], b[2];
  for (int r = 0; r < 4; ++r) {  // reg r: row g + 8 (r & 1), cols 2t + 8 (r >> 1) and the next
    const int row = g + 8 * (r & 1), col = 2 * t + 8 * (r >> 1);
    a[r] = pack2(A[row * 16 + col].bits, A[row * 16 + col + 1].bits);
  }
  for (int r = 0; r < 2; ++r) {  // reg r: k = 2t + 8r and the next, n = g
    const int k = 2 * t + 8 * r;
    b[r] = pack2(B[k * 8 + g].bits, B[(k + 1) * 8 + g].bits);
  }
  float c[4], d[4];
  for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)];
  mma_op(T{}, d, a, b, c);
  for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 8 + 2 * t + (i & 1)] = d[i];
}
extern "C" __global__ void vgpu_mma_bf16(const bf16* A, const bf16* B, const float* C, float* D) {
  mma_tile(A, B, C, D);
}
extern "C" __global__ void vgpu_mma_f16(const f16* A, const f16* B, const float* C, float* D) {
  mma_tile(A, B, C, D);
}

// D (16x16) = A (16x16) B (16x16) + C, all row-major, one warp: A through ldmatrix.x4, B through
// ldmatrix.x4.trans (two n-tiles), the way a GEMM feeds the tensor cores.
extern "C" __global__ void vgpu_mma_ldmatrix_bf16(const bf16* A, const bf16* B, const float* C, float* D) {
  EMU_SHARED(bf16, As, [16][24]);  // padded rows: 48 bytes apart, still 16-byte aligned
  EMU_SHARED(bf16, Bs, [16][16]);
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) {
    As[i / 16][i % 16] = A[i];
    Bs[i / 16][i % 16] = B[i];
  }
  __syncthreads();
  unsigned a[4], b[4];
  emu::ldmatrix_x4(a, &As[lane % 16][(lane / 16) * 8]);
  emu::ldmatrix_x4_trans(b, &Bs[((lane >> 3) & 1) * 8 + (lane & 7)][(lane >> 4) * 8]);
  const int g = lane >> 2, t = lane & 3;
  for (int nt = 0; nt < 2; ++nt) {
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i >> 1)) * 16 + nt * 8 + 2 * t + (i & 1)];
    const unsigned bn[2] = {b[2 * nt], b[2 * nt + 1]};
    emu::mma_m16n8k16_bf16(d, a, bn, c);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i >> 1)) * 16 + nt * 8 + 2 * t + (i & 1)] = d[i];
  }
}

// ldmatrix layouts. src: 32 rows of 16 16-bit values; lane L gives the address of row L of the
// tile at column 8 (L & 1), so the rows of one 8x8 matrix are not contiguous. Lanes the variant
// does not use (8 and up for .x1, 16 and up for .x2) give a misaligned address, which the
// hardware ignores. out[(variant * 32 + lane) * 4 + reg], variants x1 x2 x4 x1.trans x2.trans
// x4.trans, unused registers 0.
extern "C" __global__ void vgpu_ldmatrix_u32(const unsigned short* src, unsigned* out) {
  EMU_SHARED(unsigned short, t, [32][16]);
  const int lane = threadIdx.x;
  for (int i = lane; i < 32 * 16; i += 32) t[i / 16][i % 16] = src[i];
  __syncwarp();
  const void* row = &t[lane][8 * (lane & 1)];
  const void* unused = &t[0][1];
  for (int v = 0; v < 6; ++v) {
    unsigned r[4] = {0u, 0u, 0u, 0u};
    const bool trans = v >= 3;
    const int count = 1 << (v % 3);
    const void* p = lane < 8 * count ? row : unused;
    if (count == 1) {
      unsigned q[1];
      if (trans) emu::ldmatrix_x1_trans(q, p);
      else emu::ldmatrix_x1(q, p);
      r[0] = q[0];
    } else if (count == 2) {
      unsigned q[2];
      if (trans) emu::ldmatrix_x2_trans(q, p);
      else emu::ldmatrix_x2(q, p);
      r[0] = q[0];
      r[1] = q[1];
    } else if (trans) {
      emu::ldmatrix_x4_trans(r, p);
    } else {
      emu::ldmatrix_x4(r, p);
    }
    for (int k = 0; k < 4; ++k) out[(v * 32 + lane) * 4 + k] = r[k];
  }
}

// cp.async, 64 threads, two groups: stage 0 = in[0, 256), stage 1 = in[256, 256 + valid) zero-filled
// to 256 floats (16-byte chunks of 16, 12, 8, 4 or 0 source bytes). out[0, 256) is stage 0 read
// after wait_group 1, out[256, 512) stage 1 after wait_group 0, both shifted by one chunk so
// every thread reads another thread's copy. early[tid] probes stage 1 after wait_group 1, while
// its group may still be in flight: the virtual GPU delivers copies only at the wait, so there it
// must still be poison (a test-only read, racy on a real GPU).
extern "C" __global__ void vgpu_cp_async_f32(const float* in, int valid, float* out, float* early) {
  EMU_SHARED(float, s, [2][256]);
  const int tid = threadIdx.x;
  emu::cp_async_16(&s[0][4 * tid], in + 4 * tid);
  emu::cp_async_commit();
  const int rem = valid - 4 * tid;
  const unsigned bytes = rem >= 4 ? 16u : rem > 0 ? 4u * rem : 0u;
  emu::cp_async_16(&s[1][4 * tid], in + 256 + (bytes ? 4 * tid : 0), bytes);
  emu::cp_async_commit();
  emu::cp_async_wait<1>();
  __syncthreads();
  for (int i = tid; i < 256; i += 64) out[i] = s[0][(i + 4) % 256];
  early[tid] = s[1][4 * tid];
  emu::cp_async_wait<0>();
  __syncthreads();
  for (int i = tid; i < 256; i += 64) out[256 + i] = s[1][(i + 4) % 256];
}

// Partial warps (blockDim.x = 48: warp 1 has 16 lanes); collectives use the mask of the lanes that
// exist. out[3 * (block offset + tid) + k]: ballot of odd lanes; the warp's sum of tid + 1 (lane 0
// only, 0 elsewhere); tid of the warp's last lane.
extern "C" __global__ void vgpu_partial_warp_i32(int* out) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  out += 3 * blockIdx.x * blockDim.x;
  const int lanes = min(32, (int)blockDim.x - 32 * warp);
  const unsigned mask = lanes == 32 ? FULL_MASK : (1u << lanes) - 1u;
  int v = tid + 1;
  for (int o = 16; o > 0; o >>= 1) {
    const int u = __shfl_down_sync(mask, v, o);
    if (lane + o < lanes) v += u;
  }
  out[3 * tid + 0] = (int)__ballot_sync(mask, lane & 1);
  out[3 * tid + 1] = lane == 0 ? v : 0;
  out[3 * tid + 2] = __shfl_sync(mask, tid, lanes - 1);
}

// 3-D blocks and grids. Per thread (t = linear thread index, b = linear block index) eight words
// at out + 8 (b * threads + t): threadIdx, blockIdx, blockDim, gridDim (x | y << 10 | z << 20),
// the value thread (threads - 1 - t) stored to shared memory before a barrier, the ballot of the
// warp (= its mask of existing lanes), the t of the warp's lane 0 (a shuffle), and b.
__device__ __forceinline__ unsigned pack3(unsigned x, unsigned y, unsigned z) { return x | y << 10 | z << 20; }
extern "C" __global__ void vgpu_index3d_u32(unsigned* out) {
  EMU_SHARED(unsigned, s, [1024]);
  const unsigned t = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
  const unsigned b = (blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const unsigned lanes = min(32u, nt - (t & ~31u));
  const unsigned mask = lanes == 32 ? FULL_MASK : (1u << lanes) - 1u;
  s[t] = 7 * t;
  __syncthreads();
  unsigned* o = out + 8 * (b * nt + t);
  o[0] = pack3(threadIdx.x, threadIdx.y, threadIdx.z);
  o[1] = pack3(blockIdx.x, blockIdx.y, blockIdx.z);
  o[2] = pack3(blockDim.x, blockDim.y, blockDim.z);
  o[3] = pack3(gridDim.x, gridDim.y, gridDim.z);
  o[4] = s[nt - 1 - t];
  o[5] = __ballot_sync(mask, 1);
  o[6] = __shfl_sync(mask, t, 0);
  o[7] = b;
}

// ---------------------------------------------------------------- broken kernels

// RAW race: reads the neighbour's shared value without a barrier (256 threads).
extern "C" __global__ void vgpu_bug_stencil_f32(const float* x, float* y) {
  EMU_SHARED(float, s, [256]);
  const int tid = threadIdx.x;
  s[tid] = x[tid];
  // BUG: __syncthreads() missing
  y[tid] = s[tid] + (tid > 0 ? s[tid - 1] : 0.f);
}

// Divergent barrier: half the block waits at one __syncthreads, the other half at another.
extern "C" __global__ void vgpu_bug_divergent_barrier_f32(float* out) {
  if (threadIdx.x < 128) __syncthreads();  // @divergent-a
  out[threadIdx.x] = 1.f;
  __syncthreads();  // @divergent-b
}

// Early return before a barrier (undefined in CUDA; accepted by the lenient mode).
extern "C" __global__ void vgpu_bug_early_exit_f32(float* out) {
  if (threadIdx.x >= 200) return;
  __syncthreads();  // @early-exit
  out[threadIdx.x] = 1.f;
}

// EMU_SHARED overflow by 8 elements: the last writes land in the red zone, outputs 0..7 are
// never written (NaN), and AddressSanitizer reports the write.
extern "C" __global__ void vgpu_bug_smem_overflow_f32(float* out) {
  EMU_SHARED(float, s, [256]);
  s[threadIdx.x + 8] = 1.f;  // @smem-overflow
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

// Global out-of-bounds read: thread n - 1 reads x[n]. Silent without AddressSanitizer.
extern "C" __global__ void vgpu_bug_global_oob_f32(const float* x, float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + 1];  // @global-oob
}

// Missing cp.async wait: shared memory is read before the copies complete (128 threads).
extern "C" __global__ void vgpu_bug_cp_async_no_wait_f32(const float* in, float* out) {
  EMU_SHARED(float, s, [128 * 4]);
  emu::cp_async_16(&s[threadIdx.x * 4], in + threadIdx.x * 4);
  emu::cp_async_commit();
  // BUG: emu::cp_async_wait<0>() missing here
  __syncthreads();
  out[threadIdx.x] = s[((threadIdx.x + 1) % 128) * 4];
  __syncthreads();
  emu::cp_async_wait<0>();  // late (after every read), so that no copy is pending at exit
}

// Shuffle after the upper half of each warp returned.
extern "C" __global__ void vgpu_bug_shfl_after_exit_f32(float* out) {
  float v = threadIdx.x;
  if ((threadIdx.x & 31) >= 16) return;
  v += __shfl_xor_sync(FULL_MASK, v, 1);  // @shfl-after-exit
  out[threadIdx.x] = v;
}

// mma.sync in a partial warp (blockDim.x = 48).
extern "C" __global__ void vgpu_bug_mma_partial_warp_f32(float* out) {
  const unsigned a[4] = {0u, 0u, 0u, 0u}, b[2] = {0u, 0u};
  const float c[4] = {0.f, 0.f, 0.f, 0.f};
  float d[4];
  emu::mma_m16n8k16_bf16(d, a, b, c);  // @mma-partial
  out[threadIdx.x] = d[0];
}

// ldmatrix with row addresses that are not 16-byte aligned.
extern "C" __global__ void vgpu_bug_ldmatrix_misaligned_f32(float* out) {
  EMU_SHARED(bf16, t, [16][24]);
  for (int i = threadIdx.x; i < 16 * 24; i += 32) t[i / 24][i % 24] = from_f32<bf16>(1.f);
  __syncwarp();
  unsigned r[4];
  emu::ldmatrix_x4(r, &t[threadIdx.x & 15][1]);  // @ldmatrix-misaligned
  out[threadIdx.x] = (float)r[0];
}

// Deadlock: lanes 0-15 wait at a block barrier for lanes 16-31, which wait in a shuffle for them.
extern "C" __global__ void vgpu_bug_warp_barrier_deadlock_f32(float* out) {
  float v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) {
    __syncthreads();  // @deadlock-barrier
  } else {
    v = __shfl_xor_sync(FULL_MASK, v, 1);  // @deadlock-shfl
  }
  out[threadIdx.x] = v;
}

// ---------------------------------------------------------------- wgmma (sm_90a)
// One warpgroup (128 threads, 17 KB of dynamic shared memory) computes D[64x256] = A[64x16] B[16x256]
// with A K-major ([64][16] in global memory) and B MN-major ([16][256]), both copied by cp.async into
// 128-byte-swizzled tiles, D stored row-major from the accumulator fragments. `bug` plants one
// mistake for the vgpu_bug_wgmma_* kernels below (their operands are garbage: only the error counts).
enum WgmmaBug { kNone, kNoFence, kNoProxyFence, kPlainStore, kOverwrite, kAccumulatorWrite, kNoWait, kDivergent };

#ifdef HAS_WGMMA
__device__ __forceinline__ unsigned swizzle128(unsigned off) { return off ^ (((off >> 7) & 7) << 4); }

__device__ __forceinline__ void wgmma_probe(const bf16* a, const bf16* b, float* d, WgmmaBug bug) {
  EMU_DYNAMIC_SHARED(uint4, smem);
  unsigned char* raw = reinterpret_cast<unsigned char*>(smem);
  unsigned char* tile = raw + ((1024u - (emu::smem_u32(raw) & 1023u)) & 1023u);
  const unsigned t = threadIdx.x;
  // A: row r of 16 k is chunks 0-1 of a 128-byte row. B: 8 k x 64 n atoms, 64-n blocks 1 KB apart
  // (LBO), 8-k groups 4 KB apart (SBO), after A's 8 KB.
  const unsigned ar = t / 2, ak = (t % 2) * 8;
  emu::cp_async_16(tile + swizzle128(ar * 128 + ak * 2), a + ar * 16 + ak);
  for (unsigned c = t; c < 512; c += 128) {
    const unsigned k = c / 32, n = (c % 32) * 8;
    emu::cp_async_16(tile + 8192 + swizzle128((k / 8) * 4096 + (n / 64) * 1024 + (k % 8) * 128 + (n % 64) * 2),
                     b + k * 256 + n);
  }
  emu::cp_async_commit();
  emu::cp_async_wait<0>();
  if (bug != kNoProxyFence) emu::fence_proxy_async();
  __syncthreads();
  if (bug == kPlainStore) {  // an ordinary store into A, published by a barrier but no proxy fence
    tile[t] ^= 0x5a;
    __syncthreads();
  }

  float acc[128];
  for (int i = 0; i < 128; ++i) acc[i] = 0.0f;
  const unsigned addr = emu::smem_u32(tile);
  const unsigned long long swizzle = 1ull << 62;
  unsigned long long desc_a = (addr >> 4) | (16ull >> 4) << 16 | (1024ull >> 4) << 32 | swizzle;
  const unsigned long long desc_b = ((addr + 8192) >> 4) | (1024ull >> 4) << 16 | (4096ull >> 4) << 32 | swizzle;
  if (bug == kDivergent && t == 77) desc_a += 2;
  if (bug != kNoFence) emu::wgmma_fence();
  emu::wgmma_m64n256k16_bf16<0, 1>(acc, desc_a, desc_b);  // @wgmma
  emu::wgmma_commit();
  if (bug == kOverwrite) tile[t] = ~tile[t];
  if (bug == kAccumulatorWrite) acc[t % 128] += 1.0f;
  if (bug != kNoWait) emu::wgmma_wait<0>();
  if (!d) return;
  const unsigned warp = t / 32, lane = t % 32;
  for (int i = 0; i < 128; ++i)
    d[(16 * warp + lane / 4 + 8 * ((i / 2) % 2)) * 256 + 8 * (i / 4) + 2 * (lane % 4) + i % 2] = acc[i];
}
#define WGMMA_PROBE(a, b, d, bug) wgmma_probe(a, b, d, bug)
#else
#define WGMMA_PROBE(a, b, d, bug) __trap()
#endif

extern "C" __global__ void vgpu_wgmma_bf16(const bf16* a, const bf16* b, float* d) { WGMMA_PROBE(a, b, d, kNone); }

// The bug kernels read their operands from the first 10 KB of `out` (launch 20 blocks of 128) and
// write no result.
#define WGMMA_BUG(name, bug)                                                                           \
  extern "C" __global__ void vgpu_bug_wgmma_##name##_f32(float* out) {                                 \
    WGMMA_PROBE(reinterpret_cast<const bf16*>(out), reinterpret_cast<const bf16*>(out) + 64 * 16, nullptr, \
                bug);                                                                                  \
  }
WGMMA_BUG(no_fence, kNoFence)
WGMMA_BUG(no_proxy_fence, kNoProxyFence)
WGMMA_BUG(plain_store, kPlainStore)
WGMMA_BUG(overwrite, kOverwrite)
WGMMA_BUG(accumulator_write, kAccumulatorWrite)
WGMMA_BUG(no_wait, kNoWait)
WGMMA_BUG(divergent, kDivergent)

// ---------------------------------------------------------------- mbarrier and TMA (sm_90)
// Thread 0 arms an mbarrier and loads the 64 x 16 (x 1) box at (x, y, z) of `map` (16-bit elements)
// into 1024-byte-aligned shared memory (2 KB + 1 KB to align); every thread waits for the phase, then
// thread t copies box row t / 8 (un-swizzled) to out[64 * (t / 8) ..] as floats: 128 threads cover
// the box. `bug` plants one mistake: 1 nobody waits, 2 the barrier expects more bytes than arrive,
// 3 the barrier is never initialised, 4 one arrival too many.
extern "C" __global__ void vgpu_tma_bf16(const __grid_constant__ TensorMap map, int x, int y, int z, float* out,
                                         int bug) {
#ifdef HAS_WGMMA
  // not `smem`: this extern "C" function would give the name C linkage, wgmma_probe's is C++
  EMU_DYNAMIC_SHARED(uint4, tma_smem);
  unsigned char* raw = reinterpret_cast<unsigned char*>(tma_smem);
  unsigned char* box = raw + ((1024u - (emu::smem_u32(raw) & 1023u)) & 1023u);
  unsigned long long* bar = reinterpret_cast<unsigned long long*>(box + 2048);
  const unsigned t = threadIdx.x;
  if (t == 0) {
    if (bug != 3) emu::mbarrier_init(bar, 1);
    emu::fence_mbarrier_init();
  }
  __syncthreads();
  if (t == 0) {
    emu::mbarrier_arrive_expect_tx(bar, bug == 2 ? 4096 : 2048);
    emu::tma_load_3d(box, &map, x, y, z, bar);                      // @tma-load
    if (bug == 4) emu::mbarrier_arrive(bar);                        // @tma-extra-arrive
  }
  if (bug == 1) return;
  emu::mbarrier_wait(bar, 0);  // @tma-wait
  const unsigned row = t / 8;
  for (unsigned c = (t % 8) * 8; c < (t % 8) * 8 + 8; ++c) {
    const unsigned off = row * 128 + c * 2;
    out[row * 64 + c] = to_f32(*reinterpret_cast<const bf16*>(box + (off ^ (((off >> 7) & 7) << 4))));
  }
#else
  __trap();
#endif
}
