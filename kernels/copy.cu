// Fill, strided copy (any permutation, broadcast or slice to a dense tensor) and dtype casts.
#include "common.cuh"

template <class T>
__device__ void fill(T* out, T value, long long n) {
  GRID_STRIDE_LOOP(i, n) out[i] = value;
}
extern "C" __global__ void fill_b1(unsigned char* out, unsigned char v, long long n) { fill(out, v, n); }
extern "C" __global__ void fill_b2(unsigned short* out, unsigned short v, long long n) { fill(out, v, n); }
extern "C" __global__ void fill_b4(unsigned* out, unsigned v, long long n) { fill(out, v, n); }
extern "C" __global__ void fill_b8(unsigned long long* out, unsigned long long v, long long n) { fill(out, v, n); }

// dst viewed through `dst_view` = src viewed through `src_view` (both of the same shape); by
// element size, since a copy needs no type. Dense outputs pass a contiguous dst_view. The host
// merges dimensions both views step through alike, and 32-bit index arithmetic is used when the
// element count allows.
template <class T, class I>
__device__ void copy_strided_loop(const T* src, const Strided (&views)[2], T* dst, I n) {
  for (I i = I(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += I(gridDim.x) * blockDim.x) {
    long long off[2];
    strided_offsets(views, i, off);
    dst[off[1]] = src[off[0]];
  }
}
template <class T>
__device__ void copy_strided(const T* src, Strided src_view, T* dst, Strided dst_view, long long n) {
  const Strided views[2] = {src_view, dst_view};
  if (n <= 0x7fffffffll) {
    copy_strided_loop<T, unsigned>(src, views, dst, unsigned(n));
  } else {
    copy_strided_loop<T, long long>(src, views, dst, n);
  }
}
#define COPY_STRIDED(bytes, T)                                                                            \
  extern "C" __global__ void copy_strided_b##bytes(const T* src, Strided src_view, T* dst, Strided dst_view, \
                                                   long long n) {                                           \
    copy_strided(src, src_view, dst, dst_view, n);                                                         \
  }
COPY_STRIDED(1, unsigned char)
COPY_STRIDED(2, unsigned short)
COPY_STRIDED(4, unsigned)
COPY_STRIDED(8, unsigned long long)

// Casts follow PyTorch: floats round to nearest even through f32, float to integer truncates
// toward zero, integer to integer wraps. Where PyTorch is undefined (NaN or out-of-range floats to
// integers; its CPU path gives INT_MIN) we saturate and map NaN to 0, as the GPU's cvt.rzi.sat and
// Rust's `as` do, so the CPU, the virtual GPU and the real GPU agree on every input.
template <class I>
__device__ I saturating_int(float x, float lo, float hi_excl, I min, I max) {
  if (x != x) return 0;
  if (x <= lo) return min;
  if (x >= hi_excl) return max;
  return I(x);
}

template <class T>
struct Scalar {
  __device__ static float to_float(T x) { return to_f32(x); }
  __device__ static T from_float(float x) { return from_f32<T>(x); }
  static constexpr bool is_float = true;
};
template <>
struct Scalar<int> {
  __device__ static float to_float(int x) { return float(x); }
  __device__ static int from_float(float x) {
    return saturating_int<int>(x, -2147483648.0f, 2147483648.0f, -2147483647 - 1, 2147483647);
  }
  static constexpr bool is_float = false;
};
template <>
struct Scalar<long long> {
  __device__ static float to_float(long long x) { return float(x); }
  __device__ static long long from_float(float x) {
    return saturating_int<long long>(x, -9223372036854775808.0f, 9223372036854775808.0f,
                                     -9223372036854775807ll - 1, 9223372036854775807ll);
  }
  static constexpr bool is_float = false;
};
// To u8 through a saturating int and a wrap, as PyTorch does in range (300.0 gives 44, -1.0 gives 255).
template <>
struct Scalar<unsigned char> {
  __device__ static float to_float(unsigned char x) { return float(x); }
  __device__ static unsigned char from_float(float x) { return (unsigned char)Scalar<int>::from_float(x); }
  static constexpr bool is_float = false;
};

template <class S, class D>
__device__ D convert(S x) {
  if constexpr (!Scalar<S>::is_float && !Scalar<D>::is_float) {
    return D(x);
  } else {
    return Scalar<D>::from_float(Scalar<S>::to_float(x));
  }
}

template <class S, class D>
__device__ void cast(const S* in, D* out, long long n) {
  GRID_STRIDE_LOOP(i, n) out[i] = convert<S, D>(in[i]);
}

#define CAST(sname, S, dname, D) \
  extern "C" __global__ void cast_##sname##_##dname(const S* in, D* out, long long n) { cast<S, D>(in, out, n); }
// every ordered pair of distinct dtypes
CAST(f32, float, f16, f16) CAST(f32, float, bf16, bf16) CAST(f32, float, i32, int) CAST(f32, float, i64, long long)
CAST(f32, float, u8, unsigned char)
CAST(f16, f16, f32, float) CAST(f16, f16, bf16, bf16) CAST(f16, f16, i32, int) CAST(f16, f16, i64, long long)
CAST(f16, f16, u8, unsigned char)
CAST(bf16, bf16, f32, float) CAST(bf16, bf16, f16, f16) CAST(bf16, bf16, i32, int) CAST(bf16, bf16, i64, long long)
CAST(bf16, bf16, u8, unsigned char)
CAST(i32, int, f32, float) CAST(i32, int, f16, f16) CAST(i32, int, bf16, bf16) CAST(i32, int, i64, long long)
CAST(i32, int, u8, unsigned char)
CAST(i64, long long, f32, float) CAST(i64, long long, f16, f16) CAST(i64, long long, bf16, bf16)
CAST(i64, long long, i32, int) CAST(i64, long long, u8, unsigned char)
CAST(u8, unsigned char, f32, float) CAST(u8, unsigned char, f16, f16) CAST(u8, unsigned char, bf16, bf16)
CAST(u8, unsigned char, i32, int) CAST(u8, unsigned char, i64, long long)
