// Elementwise ops on f32/f16/bf16 storage with f32 math: unary maps (some with up to two scalar
// parameters p0, p1) and binary ops with NumPy broadcasting. Results are rounded to the storage
// type to nearest even.
//
// Every op has two entry points per dtype:
//   *_<dtype>          dense: inputs and output contiguous with the same number of elements. The
//                      main loop moves 16 bytes per load/store (4 floats, 8 halfs) when every
//                      pointer is 16-byte aligned (checked here, so narrowed views stay correct),
//                      then a scalar loop does the tail (or everything when misaligned).
//   *_strided_<dtype>  any views: transposed, narrowed, broadcast (stride 0). The output is dense;
//                      each thread turns its output index into input offsets through `Strided`
//                      descriptors. The host merges dimensions that are contiguous for every operand
//                      first, so typical cases (bias over rows, a scalar, a transposed matrix) come
//                      here with rank 1 or 2: at most one integer division per element.
// Both are memory bound: consecutive threads touch consecutive output elements, so stores (and
// loads of any operand that is contiguous along the innermost dimension) coalesce.
#include "common.cuh"

// ---------------------------------------------------------------- the ops, in f32

#define UNARY_OP(name, expr)                                                          \
  struct Op_##name {                                                                  \
    __device__ __forceinline__ static float f(float x, float p0, float p1) { return expr; } \
  };
UNARY_OP(neg, -x)
UNARY_OP(exp, expf(x))
UNARY_OP(log, logf(x))
UNARY_OP(sqrt, sqrtf(x))
UNARY_OP(rsqrt, rsqrtf(x))
// relu(NaN) is NaN, as in PyTorch (fmaxf would return 0).
UNARY_OP(relu, (x > 0.f || x != x) ? x : 0.f)
// The exact erf form, torch.nn.GELU(approximate='none').
UNARY_OP(gelu, 0.5f * x * (1.f + erff(x * 0.70710678118654752f)))
UNARY_OP(sigmoid, 1.f / (1.f + expf(-x)))
UNARY_OP(abs, fabsf(x))
UNARY_OP(powf, powf(x, p0))
// torch.clamp: NaN in x or in a bound propagates; min > max gives max everywhere.
UNARY_OP(clamp, nan_min(nan_max(x, p0), p1))
UNARY_OP(affine, x * p0 + p1)
#undef UNARY_OP

#define BINARY_OP(name, expr)                                                   \
  struct Op_##name {                                                            \
    __device__ __forceinline__ static float f(float a, float b) { return expr; } \
  };
BINARY_OP(add, a + b)
BINARY_OP(sub, a - b)
BINARY_OP(mul, a* b)
BINARY_OP(div, a / b)
// torch.maximum/minimum propagate NaN from either side.
BINARY_OP(maximum, nan_max(a, b))
BINARY_OP(minimum, nan_min(a, b))
BINARY_OP(pow, powf(a, b))
#undef BINARY_OP

// ---------------------------------------------------------------- 16-byte packs

// 16 bytes of T, loaded and stored as one uint4 (ld.global.nc.v4 / st.global.v4).
template <class T>
union Pack {
  uint4 u;
  T v[16 / sizeof(T)];
};

__device__ __forceinline__ bool aligned16(const void* p) { return ((unsigned long long)p & 15ull) == 0; }

// ---------------------------------------------------------------- unary

template <class T, class Op>
__device__ void unary_dense(const T* __restrict__ x, T* __restrict__ y, long long n, float p0, float p1) {
  constexpr int V = 16 / sizeof(T);
  long long done = 0;
  if (aligned16(x) && aligned16(y)) {
    const long long nv = n / V;
    GRID_STRIDE_LOOP(i, nv) {
      Pack<T> p;
      p.u = __ldg(reinterpret_cast<const uint4*>(x) + i);
#pragma unroll
      for (int k = 0; k < V; ++k) p.v[k] = from_f32<T>(Op::f(to_f32(p.v[k]), p0, p1));
      reinterpret_cast<uint4*>(y)[i] = p.u;
    }
    done = nv * V;
  }
  GRID_STRIDE_LOOP(i, n - done) y[done + i] = from_f32<T>(Op::f(to_f32(x[done + i]), p0, p1));
}

template <class T, class Op, class I>
__device__ void unary_strided_loop(const T* __restrict__ x, const Strided (&xv)[1], T* __restrict__ y, I n, float p0,
                                   float p1) {
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    long long off[1];
    strided_offsets(xv, i, off);
    y[i] = from_f32<T>(Op::f(to_f32(x[off[0]]), p0, p1));
  }
}

template <class T, class Op>
__device__ void unary_strided(const T* __restrict__ x, Strided xv, T* __restrict__ y, long long n, float p0,
                              float p1) {
  const Strided views[1] = {xv};
  if (n <= 0x7fffffffll) {
    unary_strided_loop<T, Op, unsigned>(x, views, y, unsigned(n), p0, p1);
  } else {
    unary_strided_loop<T, Op, long long>(x, views, y, n, p0, p1);
  }
}

#define UNARY_ENTRY(op, dname, T)                                                                            \
  extern "C" __global__ void unary_##op##_##dname(const T* x, T* y, long long n, float p0, float p1) {      \
    unary_dense<T, Op_##op>(x, y, n, p0, p1);                                                               \
  }                                                                                                          \
  extern "C" __global__ void unary_##op##_strided_##dname(const T* x, Strided xv, T* y, long long n, float p0, \
                                                          float p1) {                                        \
    unary_strided<T, Op_##op>(x, xv, y, n, p0, p1);                                                         \
  }
#define UNARY_ALL_TYPES(op) UNARY_ENTRY(op, f32, float) UNARY_ENTRY(op, f16, f16) UNARY_ENTRY(op, bf16, bf16)
UNARY_ALL_TYPES(neg)
UNARY_ALL_TYPES(exp)
UNARY_ALL_TYPES(log)
UNARY_ALL_TYPES(sqrt)
UNARY_ALL_TYPES(rsqrt)
UNARY_ALL_TYPES(relu)
UNARY_ALL_TYPES(gelu)
UNARY_ALL_TYPES(sigmoid)
UNARY_ALL_TYPES(abs)
UNARY_ALL_TYPES(powf)
UNARY_ALL_TYPES(clamp)
UNARY_ALL_TYPES(affine)

// ---------------------------------------------------------------- binary

// out[i] = f(a[i], b[i]) over dense operands, in f32: the dense path of the binary ops and of the
// fused unary backward kernels (a = x, b = dy).
template <class T, class F>
__device__ void zip_dense(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out, long long n, F f) {
  constexpr int V = 16 / sizeof(T);
  long long done = 0;
  if (aligned16(a) && aligned16(b) && aligned16(out)) {
    const long long nv = n / V;
    GRID_STRIDE_LOOP(i, nv) {
      Pack<T> pa, pb;
      pa.u = __ldg(reinterpret_cast<const uint4*>(a) + i);
      pb.u = __ldg(reinterpret_cast<const uint4*>(b) + i);
#pragma unroll
      for (int k = 0; k < V; ++k) pa.v[k] = from_f32<T>(f(to_f32(pa.v[k]), to_f32(pb.v[k])));
      reinterpret_cast<uint4*>(out)[i] = pa.u;
    }
    done = nv * V;
  }
  GRID_STRIDE_LOOP(i, n - done) out[done + i] = from_f32<T>(f(to_f32(a[done + i]), to_f32(b[done + i])));
}

template <class T, class Op, class I>
__device__ void binary_strided_loop(const T* __restrict__ a, const T* __restrict__ b, const Strided (&views)[2],
                                    T* __restrict__ out, I n) {
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    long long off[2];
    strided_offsets(views, i, off);
    out[i] = from_f32<T>(Op::f(to_f32(a[off[0]]), to_f32(b[off[1]])));
  }
}

// `av` and `bv` have the output's shape (broadcast dimensions have stride 0).
template <class T, class Op>
__device__ void binary_strided(const T* __restrict__ a, Strided av, const T* __restrict__ b, Strided bv,
                               T* __restrict__ out, long long n) {
  const Strided views[2] = {av, bv};
  if (n <= 0x7fffffffll) {
    binary_strided_loop<T, Op, unsigned>(a, b, views, out, unsigned(n));
  } else {
    binary_strided_loop<T, Op, long long>(a, b, views, out, n);
  }
}

#define BINARY_ENTRY(op, dname, T)                                                                     \
  extern "C" __global__ void binary_##op##_##dname(const T* a, const T* b, T* out, long long n) {     \
    zip_dense(a, b, out, n, [](float x, float y) { return Op_##op::f(x, y); }); \
  }                                                                                                    \
  extern "C" __global__ void binary_##op##_strided_##dname(const T* a, Strided av, const T* b, Strided bv, \
                                                           T* out, long long n) {                      \
    binary_strided<T, Op_##op>(a, av, b, bv, out, n);                                                 \
  }
#define BINARY_ALL_TYPES(op) BINARY_ENTRY(op, f32, float) BINARY_ENTRY(op, f16, f16) BINARY_ENTRY(op, bf16, bf16)
BINARY_ALL_TYPES(add)
BINARY_ALL_TYPES(sub)
BINARY_ALL_TYPES(mul)
BINARY_ALL_TYPES(div)
BINARY_ALL_TYPES(maximum)
BINARY_ALL_TYPES(minimum)
BINARY_ALL_TYPES(pow)

// ---------------------------------------------------------------- backward (gradients)
//
// The backward rules that composing existing ops would do in several passes over memory get one
// fused kernel each; the rest (neg, exp, log, affine, add, sub, mul, div) are composed in Rust.
// All recompute what they need from the saved input in f32 (one extra transcendental per element
// is free in a memory-bound kernel, and it avoids the rounding of a saved f16/bf16 output).

// <op>_backward_<dtype>(x, dy, dx, n, p0, p1): dx = dy * op'(x), all three dense. Same vector
// scheme as the forward dense kernels: 16-byte packs when all pointers are aligned, scalar tail.
// d/dx x^(-1/2) = -x^(-3/2) / 2
__device__ __forceinline__ float rsqrt_grad(float x, float dy) {
  const float r = rsqrtf(x);
  return -0.5f * dy * r * r * r;
}
__device__ __forceinline__ float sigmoid_grad(float x, float dy) {
  const float s = 1.f / (1.f + expf(-x));
  return dy * s * (1.f - s);
}
#define UNARY_GRAD(name, expr)                                                                       \
  struct Grad_##name {                                                                               \
    __device__ __forceinline__ static float f(float x, float dy, float p0, float p1) { return expr; } \
  };
UNARY_GRAD(sqrt, dy / (2.f * sqrtf(x)))
UNARY_GRAD(rsqrt, rsqrt_grad(x, dy))
// torch's threshold_backward: the gradient passes unless x <= 0, so NaN passes it.
UNARY_GRAD(relu, x <= 0.f ? 0.f : dy)
// d/dx x Φ(x) = Φ(x) + x φ(x), φ(x) = exp(-x²/2) / √(2π)
UNARY_GRAD(gelu, dy * (0.5f * (1.f + erff(x * 0.70710678118654752f)) +
                       x * 0.39894228040143268f * expf(-0.5f * x * x)))
UNARY_GRAD(sigmoid, sigmoid_grad(x, dy))
// sign(x), with sign(0) = sign(NaN) = 0 as torch's abs backward
UNARY_GRAD(abs, x > 0.f ? dy : (x < 0.f ? -dy : 0.f))
// torch masks p == 0 to a zero gradient (p x^(p-1) would be 0 * inf at x = 0)
UNARY_GRAD(powf, p0 == 0.f ? 0.f : dy * p0 * powf(x, p0 - 1.f))
// torch (2.x) passes the gradient strictly inside the bounds: 0 at lo, at hi, for NaN, and
// everywhere when lo > hi
UNARY_GRAD(clamp, (x > p0 && x < p1) ? dy : 0.f)
#undef UNARY_GRAD

#define UNARY_GRAD_ENTRY(op, dname, T)                                                                    \
  extern "C" __global__ void op##_backward_##dname(const T* x, const T* dy, T* dx, long long n, float p0, \
                                                   float p1) {                                            \
    zip_dense(x, dy, dx, n, [=](float xv, float g) { return Grad_##op::f(xv, g, p0, p1); }); \
  }
#define UNARY_GRAD_ALL_TYPES(op) \
  UNARY_GRAD_ENTRY(op, f32, float) UNARY_GRAD_ENTRY(op, f16, f16) UNARY_GRAD_ENTRY(op, bf16, bf16)
UNARY_GRAD_ALL_TYPES(sqrt)
UNARY_GRAD_ALL_TYPES(rsqrt)
UNARY_GRAD_ALL_TYPES(relu)
UNARY_GRAD_ALL_TYPES(gelu)
UNARY_GRAD_ALL_TYPES(sigmoid)
UNARY_GRAD_ALL_TYPES(abs)
UNARY_GRAD_ALL_TYPES(powf)
UNARY_GRAD_ALL_TYPES(clamp)

// <op>_backward_<dtype>(a, av, b, bv, dy, da, db, n) for maximum, minimum and pow: the gradients
// of both operands over the output's shape (dense; the host sums them back over broadcast
// dimensions). a and b are read through their broadcast views as in binary_strided; dy, da and db
// are dense, so their element is i. da or db is null when that operand needs no gradient (a
// uniform branch). These ops are rare in training, so there is no separate vectorised dense path:
// dense operands coalesce to rank 1, where strided_offsets does no division.
struct Grad2_maximum {
  // torch: ties split the gradient, NaN on either side gives it to both
  __device__ __forceinline__ static void f(float a, float b, float dy, float& da, float& db) {
    const float g = a == b ? 0.5f * dy : dy;
    da = a < b ? 0.f : g;
    db = a > b ? 0.f : g;
  }
};
struct Grad2_minimum {
  __device__ __forceinline__ static void f(float a, float b, float dy, float& da, float& db) {
    const float g = a == b ? 0.5f * dy : dy;
    da = a > b ? 0.f : g;
    db = a < b ? 0.f : g;
  }
};
struct Grad2_pow {
  // torch's masks: b == 0 gives da = 0; a == 0 with b >= 0 gives db = 0 (not 0 * -inf)
  __device__ __forceinline__ static void f(float a, float b, float dy, float& da, float& db) {
    da = b == 0.f ? 0.f : dy * b * powf(a, b - 1.f);
    db = (a == 0.f && b >= 0.f) ? 0.f : dy * powf(a, b) * logf(a);
  }
};

template <class T, class Grad, class I>
__device__ void binary_backward_loop(const T* __restrict__ a, const T* __restrict__ b, const Strided (&views)[2],
                                     const T* __restrict__ dy, T* __restrict__ da, T* __restrict__ db, I n) {
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    long long off[2];
    strided_offsets(views, i, off);
    float ga, gb;
    Grad::f(to_f32(a[off[0]]), to_f32(b[off[1]]), to_f32(dy[i]), ga, gb);
    if (da) da[i] = from_f32<T>(ga);
    if (db) db[i] = from_f32<T>(gb);
  }
}

template <class T, class Grad>
__device__ void binary_backward(const T* __restrict__ a, Strided av, const T* __restrict__ b, Strided bv,
                                const T* __restrict__ dy, T* __restrict__ da, T* __restrict__ db, long long n) {
  const Strided views[2] = {av, bv};
  if (n <= 0x7fffffffll) {
    binary_backward_loop<T, Grad, unsigned>(a, b, views, dy, da, db, unsigned(n));
  } else {
    binary_backward_loop<T, Grad, long long>(a, b, views, dy, da, db, n);
  }
}

#define BINARY_GRAD_ENTRY(op, dname, T)                                                                        \
  extern "C" __global__ void op##_backward_##dname(const T* a, Strided av, const T* b, Strided bv, const T* dy, \
                                                   T* da, T* db, long long n) {                                \
    binary_backward<T, Grad2_##op>(a, av, b, bv, dy, da, db, n);                                               \
  }
#define BINARY_GRAD_ALL_TYPES(op) \
  BINARY_GRAD_ENTRY(op, f32, float) BINARY_GRAD_ENTRY(op, f16, f16) BINARY_GRAD_ENTRY(op, bf16, bf16)
BINARY_GRAD_ALL_TYPES(maximum)
BINARY_GRAD_ALL_TYPES(minimum)
BINARY_GRAD_ALL_TYPES(pow)

// select_backward_<dtype>(idx, g, dx, n, inner, total): the gradient of picking one element per
// slice along an axis (max and min along a dimension): the input seen as [outer, n, inner], idx
// and g as [outer, inner]; dx[o, k, j] = g[o, j] where k == idx[o, j], else 0. One thread per
// element of dx, so the stores coalesce; neighbouring threads read the same or neighbouring idx
// and g, which the cache serves.
template <class T, class I>
__device__ void select_backward_loop(const long long* __restrict__ idx, const T* __restrict__ g, T* __restrict__ dx,
                                     I n, I inner, I total) {
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += I(gridDim.x) * blockDim.x) {
    const I j = i % inner, t = i / inner;
    const I k = t % n, o = t / n;
    const I slice = o * inner + j;
    dx[i] = idx[slice] == (long long)k ? g[slice] : from_f32<T>(0.f);
  }
}

template <class T>
__device__ void select_backward(const long long* idx, const T* g, T* dx, long long n, long long inner,
                                long long total) {
  if (total <= 0x7fffffffll) {
    select_backward_loop<T, unsigned>(idx, g, dx, unsigned(n), unsigned(inner), unsigned(total));
  } else {
    select_backward_loop<T, long long>(idx, g, dx, n, inner, total);
  }
}

#define SELECT_GRAD_ENTRY(dname, T)                                                                   \
  extern "C" __global__ void select_backward_##dname(const long long* idx, const T* g, T* dx, long long n, \
                                                     long long inner, long long total) {              \
    select_backward<T>(idx, g, dx, n, inner, total);                                                  \
  }
SELECT_GRAD_ENTRY(f32, float)
SELECT_GRAD_ENTRY(f16, f16)
SELECT_GRAD_ENTRY(bf16, bf16)
