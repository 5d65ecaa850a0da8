// 2-D convolution, channels-last (x [N, H, W, C], weights [O, KH, KW, C/G], out [N, OH, OW, O]),
// as im2col + a GEMM per group through the matmul kernels (SIMT for f32, the tensor-core families
// for f16/bf16) + one epilogue pass. These kernels are the parts around the GEMMs; all compute in
// f32 and store in the tensor's dtype. With M = N * OH * OW output pixels, K = KH * KW * C/G:
//
//   conv_im2col_*:   col [M, G * K], column (g, kh, kw, ci) of row (n, oh, ow) holding
//                    x[n, oh * sh - ph + kh * dh, ow * sw - pw + kw * dw, g * C/G + ci], or 0 in the
//                    padding. A thread per element: consecutive threads read consecutive channels.
//                    Used by the forward and by wgrad (which recomputes it instead of keeping it).
//   conv_epilogue_*: out[m, g * O/G + j] = relu?(prod[g, m, j] + bias[g * O/G + j] + residual[m, ..])
//                    from the grouped GEMM's output prod [G, M, O/G]: the bias, the residual, the
//                    ReLU and the move of the groups into the channels in one pass.
//   conv_col2im_*:   dgrad's second half. From dcol [G, M, K] = dout[:, g] @ w[g], every input element
//                    (a thread each) gathers the dcol entries of the (output pixel, kh, kw) positions
//                    that read it, in (kh, kw) order: a gather, so no atomics and a fixed summation
//                    order. A 1x1 stride-1 convolution has one such position per element.
//
// wgrad is a GEMM, dw[g] = dout[:, g]^T @ col[:, g], with no kernel of its own; the ReLU mask of
// the backward is the elementwise relu_backward kernel applied to the output.
//
// A true implicit-GEMM kernel (im2col addresses generated while loading the tensor-core tiles,
// with the epilogue in the GEMM's registers) is a follow-up: it saves the col round trip through
// memory.
#include "common.cuh"

// Mirrors `ConvShape` in src/ops/conv/gpu.rs.
struct ConvShape {
  long long n, h, w, c, o, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw, groups;
};
EMU_ABI_LAYOUT(ConvShape, n, h, w, c, o, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw, groups);

template <class T>
__device__ void conv_im2col(const T* __restrict__ x, T* __restrict__ col, ConvShape s) {
  const long long cg = s.c / s.groups, k = s.kh * s.kw * cg, ktot = s.groups * k;
  const long long total = s.n * s.oh * s.ow * ktot;
  GRID_STRIDE_LOOP(e, total) {
    const long long r = e / ktot, q = e % ktot;
    const long long g = q / k, t = q % k;
    const long long kh = t / (s.kw * cg), kw = (t / cg) % s.kw, ci = t % cg;
    const long long n = r / (s.oh * s.ow), oh = (r / s.ow) % s.oh, ow = r % s.ow;
    const long long ih = oh * s.sh - s.ph + kh * s.dh, iw = ow * s.sw - s.pw + kw * s.dw;
    const bool inside = ih >= 0 && ih < s.h && iw >= 0 && iw < s.w;
    col[e] = inside ? x[((n * s.h + ih) * s.w + iw) * s.c + g * cg + ci] : from_f32<T>(0.f);
  }
}

template <class T>
__device__ void conv_epilogue(const T* __restrict__ prod, const T* __restrict__ bias,
                              const T* __restrict__ residual, T* __restrict__ out, long long m, long long o,
                              long long groups, int relu) {
  const long long og = o / groups;
  GRID_STRIDE_LOOP(e, m * o) {
    const long long r = e / o, oc = e % o, g = oc / og, j = oc % og;
    float v = to_f32(prod[(g * m + r) * og + j]);
    if (bias) v += to_f32(bias[oc]);
    if (residual) v += to_f32(residual[e]);
    // relu(NaN) is NaN, as in PyTorch
    if (relu && !(v > 0.f || v != v)) v = 0.f;
    out[e] = from_f32<T>(v);
  }
}

// The output position that reads input position i through kernel tap t, or -1.
__device__ __forceinline__ long long conv_source(long long i, long long t, long long pad, long long dil,
                                                 long long stride, long long out_len) {
  const long long shifted = i + pad - t * dil;
  if (shifted < 0 || shifted % stride != 0) return -1;
  const long long o = shifted / stride;
  return o < out_len ? o : -1;
}

template <class T>
__device__ void conv_col2im(const T* __restrict__ dcol, T* __restrict__ dx, ConvShape s) {
  const long long cg = s.c / s.groups, k = s.kh * s.kw * cg, m = s.n * s.oh * s.ow;
  GRID_STRIDE_LOOP(e, s.n * s.h * s.w * s.c) {
    const long long c = e % s.c, iw = (e / s.c) % s.w, ih = (e / (s.c * s.w)) % s.h, n = e / (s.c * s.w * s.h);
    const long long g = c / cg, ci = c % cg;
    float sum = 0.f;
    for (long long kh = 0; kh < s.kh; ++kh) {
      const long long oh = conv_source(ih, kh, s.ph, s.dh, s.sh, s.oh);
      if (oh < 0) continue;
      for (long long kw = 0; kw < s.kw; ++kw) {
        const long long ow = conv_source(iw, kw, s.pw, s.dw, s.sw, s.ow);
        if (ow < 0) continue;
        const long long r = (n * s.oh + oh) * s.ow + ow;
        sum += to_f32(dcol[(g * m + r) * k + (kh * s.kw + kw) * cg + ci]);
      }
    }
    dx[e] = from_f32<T>(sum);
  }
}

#define CONV_KERNELS(name, T)                                                                                     \
  extern "C" __global__ void conv_im2col_##name(const T* x, T* col, ConvShape s) { conv_im2col(x, col, s); }      \
  extern "C" __global__ void conv_epilogue_##name(const T* prod, const T* bias, const T* residual, T* out,        \
                                                  long long m, long long o, long long groups, int relu) {         \
    conv_epilogue(prod, bias, residual, out, m, o, groups, relu);                                                 \
  }                                                                                                               \
  extern "C" __global__ void conv_col2im_##name(const T* dcol, T* dx, ConvShape s) { conv_col2im(dcol, dx, s); }
CONV_KERNELS(f32, float)
CONV_KERNELS(f16, f16)
CONV_KERNELS(bf16, bf16)
