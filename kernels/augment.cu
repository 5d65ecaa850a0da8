// The training augmentation of CosPlace / EigenPlaces: torchvision's ColorJitter and
// RandomResizedCrop on channels-last f32 images [N, H, W, 3] in [0, 1], every image with its own
// parameters (drawn on the host). f32 only. The CPU twins in src/ops/augment/cpu.rs do the same
// arithmetic, each torch op rounded to f32 as torchvision's tensor functions round it.
//
// ColorJitter: per image, order[4] (the steps in the order applied: 0 brightness, 1 contrast,
// 2 saturation, 3 hue) and factor[4] (brightness, contrast, saturation, hue). A step whose factor is
// the identity (1, 1, 1, 0) is skipped, as ColorJitter skips a step of strength 0.
//
//   color_jitter_means_f32: a block per image: the mean over the image of the grey value
//                           0.2989 r + 0.587 g + 0.114 b of each pixel as it is when contrast comes
//                           (the steps before contrast in the image's order applied on the fly), the
//                           sum in f64 (a fixed tree: the same bits every run) rounded to f32 at the
//                           end; 0 where contrast is skipped.
//   color_jitter_f32:       a thread per pixel applies the image's steps in its order.
//
// The steps: torchvision's _blend(x, other, f) = clamp(f * x + (1 - f) * other, 0, 1) with
// 1 - f in f64 (Python) rounded to f32, other = 0 (brightness), the image's grey mean (contrast),
// the pixel's grey value (saturation); hue: _rgb2hsv, h = (h + f) mod 1 (torch.remainder), _hsv2rgb.
//
//   resized_crop_f32: a thread per output element: crop + bilinear resize (aten's antialiased or
//                     plain bilinear) as a weighted sum over the box's rows of weighted sums over its
//                     columns, the weights and image positions tabulated on the host per image and
//                     output position (row_first[n * OH + oy] .. row_first[n * OH + oy + 1] index
//                     row_index / row_weight; columns alike), summed in the order aten sums its
//                     horizontal then vertical passes, so that the result is theirs.
#include "common.cuh"

#define JITTER_BRIGHTNESS 0
#define JITTER_CONTRAST 1
#define JITTER_SATURATION 2
#define JITTER_HUE 3
// Threads of a color_jitter_means_f32 block (src/ops/augment/gpu.rs launches this many).
#define MEANS_THREADS 256

__device__ __forceinline__ float clamp01(float v) { return v < 0.f ? 0.f : (v > 1.f ? 1.f : v); }

__device__ __forceinline__ float grey(const float (&p)[3]) { return 0.2989f * p[0] + 0.587f * p[1] + 0.114f * p[2]; }

__device__ __forceinline__ bool is_identity(int step, float f) { return f == (step == JITTER_HUE ? 0.f : 1.f); }

// f * x + other_term, clamped, per channel (other_term = (1 - f) * other).
__device__ __forceinline__ void blend(float (&p)[3], float f, float other_term) {
#pragma unroll
  for (int c = 0; c < 3; ++c) p[c] = clamp01(f * p[c] + other_term);
}

// torchvision's adjust_hue: _rgb2hsv (of its three masked hue terms only the selected one can be
// non-zero), the shift modulo 1 with the divisor's sign, _hsv2rgb's one-hot choice of v, p, q, t.
__device__ __forceinline__ void adjust_hue(float (&p)[3], float shift) {
  const float r = p[0], g = p[1], b = p[2];
  const float maxc = fmaxf(fmaxf(r, g), b), minc = fminf(fminf(r, g), b);
  const bool grey_pixel = maxc == minc;
  const float cr = maxc - minc;
  const float s = cr / (grey_pixel ? 1.f : maxc);
  const float divisor = grey_pixel ? 1.f : cr;
  const float rc = (maxc - r) / divisor, gc = (maxc - g) / divisor, bc = (maxc - b) / divisor;
  float h = maxc == r ? bc - gc : (maxc == g ? 2.f + rc - bc : 4.f + gc - rc);
  h = fmodf(h / 6.f + 1.f, 1.f);
  h = fmodf(h + shift, 1.f);
  if (h < 0.f) h += 1.f;
  const float sector = floorf(h * 6.f), f = h * 6.f - sector;
  const float v = maxc;
  const float pv = clamp01(v * (1.f - s)), qv = clamp01(v * (1.f - s * f)), tv = clamp01(v * (1.f - s * (1.f - f)));
  switch (((int)sector % 6 + 6) % 6) {
    case 0: p[0] = v; p[1] = tv; p[2] = pv; break;
    case 1: p[0] = qv; p[1] = v; p[2] = pv; break;
    case 2: p[0] = pv; p[1] = v; p[2] = tv; break;
    case 3: p[0] = pv; p[1] = qv; p[2] = v; break;
    case 4: p[0] = tv; p[1] = pv; p[2] = v; break;
    default: p[0] = v; p[1] = pv; p[2] = qv; break;
  }
}

// One step of ColorJitter on a pixel; `mean` is the image's grey mean (contrast only).
__device__ __forceinline__ void jitter_step(float (&p)[3], int step, float f, float mean) {
  const float complement = (float)(1.0 - (double)f);
  switch (step) {
    case JITTER_BRIGHTNESS: blend(p, f, 0.f); break;
    case JITTER_CONTRAST: blend(p, f, complement * mean); break;
    case JITTER_SATURATION: blend(p, f, complement * grey(p)); break;
    default: adjust_hue(p, f); break;
  }
}

extern "C" __global__ void color_jitter_means_f32(const float* __restrict__ x, const int* __restrict__ order,
                                                  const float* __restrict__ factor, float* __restrict__ means,
                                                  long long pixels) {
  EMU_SHARED(double, partial, [MEANS_THREADS]);
  const long long n = blockIdx.x;
  const int* ord = order + 4 * n;
  const float* fac = factor + 4 * n;
  if (is_identity(JITTER_CONTRAST, fac[JITTER_CONTRAST])) {
    if (threadIdx.x == 0) means[n] = 0.f;
    return;
  }
  const float* img = x + 3 * n * pixels;
  double sum = 0.0;
  for (long long i = threadIdx.x; i < pixels; i += blockDim.x) {
    float p[3] = {img[3 * i], img[3 * i + 1], img[3 * i + 2]};
    for (int k = 0; k < 4 && ord[k] != JITTER_CONTRAST; ++k) {
      const float f = fac[ord[k]];
      if (!is_identity(ord[k], f)) jitter_step(p, ord[k], f, 0.f);
    }
    sum += (double)grey(p);
  }
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (unsigned half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) partial[threadIdx.x] += partial[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0) means[n] = (float)(partial[0] / (double)pixels);
}

extern "C" __global__ void color_jitter_f32(const float* __restrict__ x, float* __restrict__ y,
                                            const int* __restrict__ order, const float* __restrict__ factor,
                                            const float* __restrict__ means, long long n, long long pixels) {
  GRID_STRIDE_LOOP(e, n * pixels) {
    const long long image = e / pixels;
    float p[3] = {x[3 * e], x[3 * e + 1], x[3 * e + 2]};
    for (int k = 0; k < 4; ++k) {
      const int step = order[4 * image + k];
      const float f = factor[4 * image + step];
      if (!is_identity(step, f)) jitter_step(p, step, f, means[image]);
    }
#pragma unroll
    for (int c = 0; c < 3; ++c) y[3 * e + c] = p[c];
  }
}

extern "C" __global__ void resized_crop_f32(const float* __restrict__ x, float* __restrict__ y, long long n,
                                            long long h, long long w, long long oh, long long ow,
                                            const int* __restrict__ row_first, const int* __restrict__ row_index,
                                            const float* __restrict__ row_weight, const int* __restrict__ col_first,
                                            const int* __restrict__ col_index, const float* __restrict__ col_weight) {
  GRID_STRIDE_LOOP(e, n * oh * ow * 3) {
    const long long c = e % 3, ox = (e / 3) % ow, oy = (e / (3 * ow)) % oh, image = e / (3 * ow * oh);
    const float* img = x + image * h * w * 3 + c;
    const long long row = image * oh + oy, col = image * ow + ox;
    float acc = 0.f;
    for (int a = row_first[row]; a < row_first[row + 1]; ++a) {
      const float* line = img + (long long)row_index[a] * w * 3;
      float r = 0.f;
      for (int b = col_first[col]; b < col_first[col + 1]; ++b) r += line[(long long)col_index[b] * 3] * col_weight[b];
      acc += r * row_weight[a];
    }
    y[e] = acc;
  }
}
