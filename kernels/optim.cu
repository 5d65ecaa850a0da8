// Training-step kernels over f32 master weights and gradients: fused optimizer updates (one launch
// per parameter per step), the dynamic loss scaler's unscale + non-finite check, and gradient
// clipping by global norm. Every update is out-of-place (inputs and outputs are distinct buffers;
// the caching allocator makes that free) and follows torch.optim's single-tensor formulas
// operation by operation, so the CPU twins give the same f32 roundings.
//
// The elementwise kernels are memory-bound (SGD with momentum: 3 reads + 2 writes per element,
// Adam: 4 + 3). They use 16-byte vectors when every pointer is 16-byte aligned (our allocations
// are 256-byte aligned and parameters are dense, so that is the normal case), a grid-stride loop
// over the vectors, and a scalar loop for the tail; each thread has 4 independent elements in
// flight per array, which is what keeps HBM busy.
#include "common.cuh"

#define OPT_VEC 4

__device__ __forceinline__ bool opt_aligned(const void* p) { return ((unsigned long long)p & 15ull) == 0; }

__device__ __forceinline__ void opt_load4(const float* p, long long v, float (&x)[OPT_VEC]) {
  const float4 q = reinterpret_cast<const float4*>(p)[v];
  x[0] = q.x;
  x[1] = q.y;
  x[2] = q.z;
  x[3] = q.w;
}

__device__ __forceinline__ void opt_store4(float* p, long long v, const float (&x)[OPT_VEC]) {
  float4 q;
  q.x = x[0];
  q.y = x[1];
  q.z = x[2];
  q.w = x[3];
  reinterpret_cast<float4*>(p)[v] = q;
}

// Runs op(in values, out values) for every element i < n of NI input and NO output arrays.
template <int NI, int NO, class Op>
__device__ void opt_foreach(const float* const (&in)[NI], float* const (&out)[NO], long long n, Op op) {
  bool aligned = true;
#pragma unroll
  for (int k = 0; k < NI; ++k) aligned = aligned && opt_aligned(in[k]);
#pragma unroll
  for (int k = 0; k < NO; ++k) aligned = aligned && opt_aligned(out[k]);
  const long long nv = aligned ? n / OPT_VEC : 0;
  GRID_STRIDE_LOOP(v, nv) {
    float a[NI][OPT_VEC], r[NO][OPT_VEC];
#pragma unroll
    for (int k = 0; k < NI; ++k) opt_load4(in[k], v, a[k]);
#pragma unroll
    for (int e = 0; e < OPT_VEC; ++e) {
      float x[NI], y[NO];
#pragma unroll
      for (int k = 0; k < NI; ++k) x[k] = a[k][e];
      op(x, y);
#pragma unroll
      for (int k = 0; k < NO; ++k) r[k][e] = y[k];
    }
#pragma unroll
    for (int k = 0; k < NO; ++k) opt_store4(out[k], v, r[k]);
  }
  const long long done = nv * OPT_VEC;
  GRID_STRIDE_LOOP(t, n - done) {
    const long long i = done + t;
    float x[NI], y[NO];
#pragma unroll
    for (int k = 0; k < NI; ++k) x[k] = in[k][i];
    op(x, y);
#pragma unroll
    for (int k = 0; k < NO; ++k) out[k][i] = y[k];
  }
}

// ---------------------------------------------------------------- SGD
// torch.optim.SGD, _single_tensor_sgd:
//   d = g + wd * p                       (grad.add(param, alpha=wd), when wd != 0)
//   buf = first ? d : buf * momentum + (1 - dampening) * d
//   d = nesterov ? d + momentum * buf : buf
//   p = p + (-lr) * d

extern "C" __global__ void sgd_f32(const float* p, const float* g, float* p_out, long long n, float neg_lr,
                                   float weight_decay) {
  const float* in[2] = {p, g};
  float* out[1] = {p_out};
  opt_foreach<2, 1>(in, out, n, [=](const float (&x)[2], float (&y)[1]) {
    float d = x[1];
    if (weight_decay != 0.f) d = d + weight_decay * x[0];
    y[0] = x[0] + neg_lr * d;
  });
}

// `buf` is not read on the first step (torch initialises the buffer with a clone of d).
extern "C" __global__ void sgd_momentum_f32(const float* p, const float* g, const float* buf, float* p_out,
                                            float* buf_out, long long n, float neg_lr, float weight_decay,
                                            float momentum, float one_minus_dampening, int nesterov, int first) {
  if (first) {
    const float* in[2] = {p, g};
    float* out[2] = {p_out, buf_out};
    opt_foreach<2, 2>(in, out, n, [=](const float (&x)[2], float (&y)[2]) {
      float d = x[1];
      if (weight_decay != 0.f) d = d + weight_decay * x[0];
      const float b = d;
      if (nesterov) d = d + momentum * b;
      y[0] = x[0] + neg_lr * d;
      y[1] = b;
    });
  } else {
    const float* in[3] = {p, g, buf};
    float* out[2] = {p_out, buf_out};
    opt_foreach<3, 2>(in, out, n, [=](const float (&x)[3], float (&y)[2]) {
      float d = x[1];
      if (weight_decay != 0.f) d = d + weight_decay * x[0];
      const float b = x[2] * momentum + one_minus_dampening * d;
      d = nesterov ? d + momentum * b : b;
      y[0] = x[0] + neg_lr * d;
      y[1] = b;
    });
  }
}

// ---------------------------------------------------------------- Adam / AdamW
// torch.optim.Adam/AdamW, _single_tensor_adam (host computes the step's scalars in f64):
//   p = p * decay                         (AdamW: decay = 1 - lr * wd; Adam: 1)
//   d = g + l2 * p                        (Adam: l2 = wd, when != 0; AdamW: 0)
//   m = lerp(m, d, 1 - beta1)             (torch's lerp: m + w * (d - m) for w < 0.5)
//   v = v * beta2 + (1 - beta2) * d * d
//   p = p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
// Mirrors `AdamScalars` in src/train/optim/gpu.rs.
struct AdamScalars {
  float decay, l2, beta1_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps;
};
EMU_ABI_LAYOUT(AdamScalars, decay, l2, beta1_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps);

__device__ __forceinline__ float opt_lerp(float self, float end, float w) {
  return (w < 0.5f && w > -0.5f) ? self + w * (end - self) : end - (end - self) * (1.f - w);
}

extern "C" __global__ void adam_f32(const float* p, const float* g, const float* m, const float* v, float* p_out,
                                    float* m_out, float* v_out, long long n, AdamScalars s) {
  const float* in[4] = {p, g, m, v};
  float* out[3] = {p_out, m_out, v_out};
  opt_foreach<4, 3>(in, out, n, [=](const float (&x)[4], float (&y)[3]) {
    const float pv = x[0] * s.decay;
    float d = x[1];
    if (s.l2 != 0.f) d = d + s.l2 * pv;
    const float mv = opt_lerp(x[2], d, s.beta1_weight);
    const float vv = x[3] * s.beta2 + s.one_minus_beta2 * d * d;
    const float denom = sqrtf(vv) / s.bc2_sqrt + s.eps;
    y[0] = pv + s.neg_step_size * mv / denom;
    y[1] = mv;
    y[2] = vv;
  });
}

// ---------------------------------------------------------------- loss scaler
// out = g * inv_scale; any non-finite g sets *found_inf = 1 (a plain store: racing writers all
// write 1). Only that int comes back to the host.
__device__ __forceinline__ bool opt_finite(float x) {
  return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

extern "C" __global__ void amp_unscale_f32(const float* g, float* out, long long n, float inv_scale, int* found_inf) {
  const float* in[1] = {g};
  float* o[1] = {out};
  bool bad = false;
  opt_foreach<1, 1>(in, o, n, [&](const float (&x)[1], float (&y)[1]) {
    bad = bad || !opt_finite(x[0]);
    y[0] = x[0] * inv_scale;
  });
  if (bad) *found_inf = 1;
}

// ---------------------------------------------------------------- clipping by global norm
// Deterministic two-stage sum of squares: each parameter's launch writes one partial per block
// (the host fixes the block count per size), then one block adds all partials in a fixed order.

// Every thread must call it; returns the block's sum in thread 0.
__device__ float opt_block_sum(float v) {
  EMU_SHARED(float, partial, [32]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  float t = 0.f;
  if (warp == 0) {
    t = lane < int(blockDim.x >> 5) ? partial[lane] : 0.f;
    t = warp_sum(t);
  }
  return t;
}

extern "C" __global__ void sumsq_partial_f32(const float* g, long long n, float* partials) {
  float acc = 0.f;
  const long long nv = opt_aligned(g) ? n / OPT_VEC : 0;
  GRID_STRIDE_LOOP(v, nv) {
    float x[OPT_VEC];
    opt_load4(g, v, x);
    acc += x[0] * x[0] + x[1] * x[1] + x[2] * x[2] + x[3] * x[3];
  }
  GRID_STRIDE_LOOP(t, n - nv * OPT_VEC) {
    const float x = g[nv * OPT_VEC + t];
    acc += x * x;
  }
  acc = opt_block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// out[0] = sqrt(sum of partials) (the total norm), out[1] = min(max_norm / (total + 1e-6), 1);
// one block.
extern "C" __global__ void clip_coef_f32(const float* partials, long long count, float max_norm, float* out) {
  float acc = 0.f;
  for (long long i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];
  acc = opt_block_sum(acc);
  if (threadIdx.x == 0) {
    const float total = sqrtf(acc);
    const float coef = max_norm / (total + 1e-6f);
    out[0] = total;
    out[1] = coef > 1.f ? 1.f : coef;  // torch.clamp(max=1): NaN stays NaN
  }
}

// out = g * factor[0] (the clip coefficient, read on the device).
extern "C" __global__ void scale_by_f32(const float* g, const float* factor, float* out, long long n) {
  const float f = factor[0];
  const float* in[1] = {g};
  float* o[1] = {out};
  opt_foreach<1, 1>(in, o, n, [=](const float (&x)[1], float (&y)[1]) { y[0] = x[0] * f; });
}
