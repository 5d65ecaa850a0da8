// Cross-entropy over logits [rows, classes] (f32, f16 or bf16; math in f32) with int64 labels,
// as F.cross_entropy computes it: loss_r = logsumexp(z_r) - z_r[y_r], rows whose label is the
// ignore index contribute nothing, and the mean divides by the number of other rows.
// The logits seen are z = scale * (x - margin * onehot(y)): CosFace's margin on cosines (scale 30
// or 100, margin 0.4), fused so its [rows, classes] logits are never written; plain
// cross-entropy passes scale 1 and margin 0, for which z = x exactly.
//
//   cross_entropy_fwd_*:   one warp per row (8 per block); one read of the row with the online
//                          max/sum rule (a new max rescales the running sum), then lane 0 reads
//                          x[y]. Writes the row's loss and its log-sum-exp (kept for backward).
//   cross_entropy_reduce:  one block sums the per-row losses in a fixed order (deterministic,
//                          no atomics, so a resumed run repeats the same bits) and divides.
//   cross_entropy_bwd_*:   one warp per row: grad = g / divisor * scale * (exp(z - lse) - onehot(y)).
//
// Loads are scalar but coalesced (a warp reads 32 consecutive elements); rows start at any
// alignment (classes is arbitrary), and the loss is a negligible part of a training step next to
// the matmuls producing the logits, so 16-byte vectors would buy little here.
#include "common.cuh"

#define CE_NEG_INF __uint_as_float(0xff800000u)
#define CE_WARPS_PER_BLOCK 8

// z as PyTorch's `s * (cos - onehot * m)` rounds it in f32.
__device__ __forceinline__ float ce_logit(float x, bool hot, float scale, float margin) {
  return scale * (x - (hot ? margin : 0.f));
}

// Running max and sum of exp(x - max) over the elements seen so far.
struct CeStats {
  float m, s;
};

__device__ __forceinline__ CeStats ce_stats_add(CeStats a, float x) {
  if (x == CE_NEG_INF) return a;  // exp(-inf) = 0; skipping avoids exp(-inf - -inf) = NaN
  if (x > a.m) {
    a.s = a.s * expf(a.m - x) + expf(x - x);  // NaN for x = +inf, as torch gives
    a.m = x;
  } else {
    a.s += expf(x - a.m);  // NaN x lands here and makes the sum NaN
  }
  return a;
}

// Commutative, so the xor butterfly leaves the same bits in every lane.
__device__ __forceinline__ CeStats ce_stats_merge(CeStats a, CeStats b) {
  if (b.m > a.m) {
    const CeStats t = a;
    a = b;
    b = t;
  }
  if (b.s == 0.f) return a;
  a.s += b.s * expf(b.m - a.m);
  return a;
}

template <class T>
__device__ void cross_entropy_fwd(const T* logits, const long long* labels, float* row_loss, float* row_lse,
                                  long long rows, long long classes, long long ignore_index, float scale,
                                  float margin) {
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  for (long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const T* x = logits + r * classes;
    const long long y = labels[r];
    CeStats s{CE_NEG_INF, 0.f};
    for (long long j = lane; j < classes; j += 32) s = ce_stats_add(s, ce_logit(to_f32(x[j]), j == y, scale, margin));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      CeStats b;
      b.m = __shfl_xor_sync(FULL_MASK, s.m, o);
      b.s = __shfl_xor_sync(FULL_MASK, s.s, o);
      s = ce_stats_merge(s, b);
    }
    if (lane == 0) {
      // max + log(sum), then x - that, as torch's log_softmax rounds it
      const float lse = s.m + logf(s.s);
      row_lse[r] = lse;
      row_loss[r] = y == ignore_index ? 0.f : lse - ce_logit(to_f32(x[y]), true, scale, margin);
    }
  }
}

// out[0] = sum(row_loss) / divisor; launched with one block.
extern "C" __global__ void cross_entropy_reduce_f32(const float* row_loss, float* out, long long rows, float divisor) {
  EMU_SHARED(float, partial, [32]);
  float acc = 0.f;
  for (long long i = threadIdx.x; i < rows; i += blockDim.x) acc += row_loss[i];
  acc = warp_sum(acc);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) partial[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    float v = lane < int(blockDim.x >> 5) ? partial[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) out[0] = v / divisor;
  }
}

template <class T>
__device__ void cross_entropy_bwd(const T* logits, const long long* labels, const float* row_lse,
                                  const float* grad_loss, T* grad, long long rows, long long classes,
                                  long long ignore_index, float divisor, float scale, float margin) {
  const float g = grad_loss[0] / divisor * scale;
  const int lane = threadIdx.x & 31;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
  for (long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
    const T* x = logits + r * classes;
    T* out = grad + r * classes;
    const long long y = labels[r];
    const float lse = row_lse[r];
    const bool ignored = y == ignore_index;
    for (long long j = lane; j < classes; j += 32) {
      const float p = expf(ce_logit(to_f32(x[j]), j == y, scale, margin) - lse);
      out[j] = from_f32<T>(ignored ? 0.f : g * (p - (j == y ? 1.f : 0.f)));
    }
  }
}

#define CROSS_ENTROPY(name, T)                                                                                     \
  extern "C" __global__ void cross_entropy_fwd_##name(const T* logits, const long long* labels, float* row_loss,  \
                                                      float* row_lse, long long rows, long long classes,           \
                                                      long long ignore_index, float scale, float margin) {        \
    cross_entropy_fwd(logits, labels, row_loss, row_lse, rows, classes, ignore_index, scale, margin);             \
  }                                                                                                                \
  extern "C" __global__ void cross_entropy_bwd_##name(const T* logits, const long long* labels,                   \
                                                      const float* row_lse, const float* grad_loss, T* grad,       \
                                                      long long rows, long long classes, long long ignore_index,  \
                                                      float divisor, float scale, float margin) {                  \
    cross_entropy_bwd(logits, labels, row_lse, grad_loss, grad, rows, classes, ignore_index, divisor, scale,      \
                      margin);                                                                                     \
  }
CROSS_ENTROPY(f32, float)
CROSS_ENTROPY(f16, f16)
CROSS_ENTROPY(bf16, bf16)
