// f16 and bf16 storage types with round-to-nearest-even conversions.
// The device side uses the PTX cvt instructions; the host side (virtual GPU) uses integer
// formulas with the same results: round to nearest even, and NaN becomes the canonical 0x7fff.
#pragma once

struct __align__(2) f16 {
  unsigned short bits;
};
struct __align__(2) bf16 {
  unsigned short bits;
};

#if defined(__CUDACC_RTC__) || defined(__CUDACC__)

__device__ __forceinline__ float f16_to_f32(f16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
  return f;
}
__device__ __forceinline__ f16 f32_to_f16(float f) {
  f16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}
__device__ __forceinline__ float bf16_to_f32(bf16 h) { return __uint_as_float(unsigned(h.bits) << 16); }
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
  bf16 h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
  return h;
}

#else

inline float f16_to_f32(f16 h) {
  const unsigned sign = unsigned(h.bits & 0x8000u) << 16;
  const unsigned exp = (h.bits >> 10) & 0x1fu;
  const unsigned mant = h.bits & 0x3ffu;
  unsigned u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    // subnormal (or zero): mant * 2^-24, exact in f32
    const float v = float(mant) * 5.9604644775390625e-8f;
    u = __float_as_uint(v) | sign;
  } else {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  }
  return __uint_as_float(u);
}

inline f16 f32_to_f16(float f) {
  const unsigned u = __float_as_uint(f);
  const unsigned short sign = (u >> 16) & 0x8000u;
  unsigned a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return f16{0x7fff};
  if (a >= 0x477ff000u) return f16{(unsigned short)(sign | 0x7c00u)};  // 65520 and up round to inf
  if (a >= 0x38800000u) {                                            // normal f16 range
    a += 0xfffu + ((a >> 13) & 1u);
    return f16{(unsigned short)(sign | ((a - 0x38000000u) >> 13))};
  }
  const unsigned e = a >> 23;
  if (e < 102) return f16{sign};  // below half the smallest subnormal
  const unsigned m = (a & 0x7fffffu) | 0x800000u;
  const unsigned shift = 126 - e;
  unsigned r = m >> shift;
  const unsigned rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
  if (rem > half || (rem == half && (r & 1u))) ++r;
  return f16{(unsigned short)(sign | r)};
}

inline float bf16_to_f32(bf16 h) { return __uint_as_float(unsigned(h.bits) << 16); }

inline bf16 f32_to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{0x7fff};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{(unsigned short)(u >> 16)};
}

#endif

// Uniform loads and stores in f32 for templated kernels: every kernel computes in f32.
__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16 x) { return f16_to_f32(x); }
__device__ __forceinline__ float to_f32(bf16 x) { return bf16_to_f32(x); }

template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ f16 from_f32<f16>(float x) {
  return f32_to_f16(x);
}
template <>
__device__ __forceinline__ bf16 from_f32<bf16>(float x) {
  return f32_to_bf16(x);
}
