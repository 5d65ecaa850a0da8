// The virtual GPU, kernel side: what a `.cu` file sees when it is built by the host C++ compiler
// with -DCUDA_EMU. Every CUDA thread runs as a fiber; a block runs on one OS thread; barriers and
// warp collectives are rendezvous points between the fibers of a block. The scheduler, the
// collectives and the tensor-core emulation live in emu_runtime.cpp; this header holds the CUDA
// vocabulary (qualifiers, built-in variables, intrinsics) and the typed launch template.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>

#define __device__
#ifdef EMU_LIST_KERNELS
// build.rs preprocesses each kernel file with this defined to find the entry points, including
// those that macros generate.
#define __global__ EMU_KERNEL_ENTRY
#else
#define __global__
#endif
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
// EMU_ABI_LAYOUT(Type, field, ...): see device.cuh. Here it is the marker from which build.rs
// generates the layout records (emu::AbiLayout) of the virtual GPU's build.
#ifdef EMU_LIST_KERNELS
#define EMU_ABI_LAYOUT(type, ...) EMU_ABI_LAYOUT_OF type(__VA_ARGS__) static_assert(true, "")
#else
#define EMU_ABI_LAYOUT(type, ...) static_assert(sizeof(type) > 0, "")
#endif

struct uint3 {
  unsigned x, y, z;
};
struct __align__(8) float2 {
  float x, y;
};
struct __align__(16) float4 {
  float x, y, z, w;
};
struct __align__(8) uint2 {
  unsigned x, y;
};
struct __align__(16) uint4 {
  unsigned x, y, z, w;
};
struct __align__(16) int4 {
  int x, y, z, w;
};

constexpr int warpSize = 32;
// Written by the scheduler: blockIdx/blockDim/gridDim once per block, threadIdx at every switch.
// uint3 has no constructor, so these are constant-initialised and need no TLS wrapper call.
inline thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;

// ---------------------------------------------------------------- bit casts and math
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
// glibc's <math.h> declares extern "C" __expf/__logf itself, so these must be macros.
#define __expf(x) ::expf(x)
#define __logf(x) ::logf(x)
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz(unsigned(x)) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
template <class T>
inline T __ldg(const T* p) {
  return *p;
}

// ---------------------------------------------------------------- atomics
// Blocks run on several OS threads at once, so these are real host atomics.
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}
inline float atomicAdd(float* p, float v) {
  unsigned* u = reinterpret_cast<unsigned*>(p);
  unsigned old = __atomic_load_n(u, __ATOMIC_RELAXED);
  while (!__atomic_compare_exchange_n(u, &old, __float_as_uint(__uint_as_float(old) + v), true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
  }
  return __uint_as_float(old);
}
template <class T, class Keep>
inline T emu_atomic_update(T* p, T v, Keep keep_old) {
  T old = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (!keep_old(old, v) && !__atomic_compare_exchange_n(p, &old, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) { return emu_atomic_update(p, v, [](int o, int n) { return o >= n; }); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
  return emu_atomic_update(p, v, [](unsigned o, unsigned n) { return o >= n; });
}
inline int atomicMin(int* p, int v) { return emu_atomic_update(p, v, [](int o, int n) { return o <= n; }); }
inline unsigned atomicMin(unsigned* p, unsigned v) {
  return emu_atomic_update(p, v, [](unsigned o, unsigned n) { return o <= n; });
}
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline unsigned atomicExch(unsigned* p, unsigned v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
inline int atomicCAS(int* p, int cmp, int val) {
  __atomic_compare_exchange_n(p, &cmp, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned val) {
  __atomic_compare_exchange_n(p, &cmp, val, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
  return cmp;
}
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------- runtime interface (emu_runtime.cpp)
namespace emu {

struct Dim3 {
  unsigned x, y, z;
};
EMU_ABI_LAYOUT(emu::Dim3, x, y, z);

// Per-launch settings chosen by the Rust driver (mirrored by `VgpuOptions` there).
struct LaunchOptions {
  unsigned long long seed;  // 0: threads run in order; otherwise the order between yield points is shuffled
  unsigned os_threads;      // OS threads that execute blocks
  unsigned stack_bytes;     // per fiber
  int lenient_barrier;      // 1: exited threads count as arrived at __syncthreads (CUDA leaves it undefined)
};
EMU_ABI_LAYOUT(emu::LaunchOptions, seed, os_threads, stack_bytes, lenient_barrier);

// One kernel file of the virtual GPU, in the table build.rs generates (`vgpu_modules`): its name,
// the dispatcher that launches its kernels by name, and those names.
struct ModuleInfo {
  const char* name;
  int (*launch)(const char* kernel, Dim3 grid, Dim3 block, unsigned smem, void** args, const LaunchOptions* opt,
                char* err, size_t errlen);
  const char* const* kernels;
  size_t kernel_count;
};
EMU_ABI_LAYOUT(emu::ModuleInfo, name, launch, kernels, kernel_count);

// How this compiler lays out a struct marked with EMU_ABI_LAYOUT: build.rs generates one record
// per marked struct and kernel file, listed in `vgpu_abi_layouts` (null-terminated), which the
// Rust test in src/device/abi.rs compares with the struct's #[repr(C)] mirror.
struct AbiField {
  const char* name;
  size_t offset, size;
};
struct AbiLayout {
  const char* module;  // the kernel file whose build this is
  const char* name;    // the struct, as EMU_ABI_LAYOUT names it
  size_t size, align;
  const AbiField* fields;  // in declaration order
  size_t field_count;
};
EMU_ABI_LAYOUT(emu::AbiField, name, offset, size);
EMU_ABI_LAYOUT(emu::AbiLayout, module, name, size, align, fields, field_count);

int run_grid(Dim3 grid, Dim3 block, unsigned smem, const LaunchOptions* opt, void (*body)(void*), void* ctx,
             char* err, size_t errlen);

// Ends the launch with an error; never returns to the kernel.
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

void syncthreads(const char* file, int line);
void syncwarp(unsigned mask, const char* file, int line);

enum class ShflKind : int { Idx, Xor, Down, Up };
void shfl(ShflKind kind, unsigned mask, const void* value, void* result, unsigned bytes, int arg, int width,
          const char* file, int line);
unsigned ballot(unsigned mask, int pred, const char* file, int line);

void mma_m16n8k16(bool bf16, float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4],
                  const char* file, int line);
void ldmatrix(unsigned count, bool trans, unsigned* r, const void* row, const char* file, int line);
void cp_async_issue(void* dst, const void* src, unsigned src_bytes, const char* file, int line);
void cp_async_commit();
void cp_async_wait(int n);

// Hopper (sm_90a). Shared memory operands of wgmma are addressed through the shared window (32-bit
// addresses, `smem_u32`); the virtual GPU maps dynamic shared memory there.
unsigned smem_u32(const void* p, const char* file = __builtin_FILE(), int line = __builtin_LINE());
void fence_proxy_async();
void wgmma_fence();
void wgmma_commit();
void wgmma_wait_group(int n);
void wgmma_issue(unsigned n, bool bf16, bool trans_a, bool trans_b, float* d, unsigned long long desc_a,
                 unsigned long long desc_b, const char* file, int line);

// Asynchronous transaction barriers in shared memory (mbarrier) and the tensor memory accelerator
// (cp.async.bulk.tensor). `TensorMap` is the opaque 128-byte CUtensorMap on the GPU; the virtual
// GPU's driver fills it with its own encoding (see `TensorMapEmu` in emu_runtime.cpp).
void mbarrier_init(unsigned long long* bar, unsigned count, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE());
void mbarrier_arrive(unsigned long long* bar, const char* file = __builtin_FILE(), int line = __builtin_LINE());
void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE());
void mbarrier_wait(unsigned long long* bar, unsigned parity, const char* file = __builtin_FILE(),
                   int line = __builtin_LINE());
inline void fence_mbarrier_init() {}
void tma_load(void* dst, const void* map, int rank, const int* coords, unsigned long long* bar, const char* file,
              int line);

struct SharedSlot {
  unsigned long long serial = ~0ull;
  void* ptr = nullptr;
};
void* block_shared(SharedSlot& slot, size_t bytes, size_t align);
void* dyn_smem();

// ---- the kernel-facing API, same names and meaning as device.cuh
inline void mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4],
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  mma_m16n8k16(true, d, a, b, c, file, line);
}
inline void mma_m16n8k16_f16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4],
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  mma_m16n8k16(false, d, a, b, c, file, line);
}
inline void ldmatrix_x1(unsigned (&r)[1], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ldmatrix(1, false, r, row, file, line);
}
inline void ldmatrix_x2(unsigned (&r)[2], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ldmatrix(2, false, r, row, file, line);
}
inline void ldmatrix_x4(unsigned (&r)[4], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  ldmatrix(4, false, r, row, file, line);
}
inline void ldmatrix_x1_trans(unsigned (&r)[1], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  ldmatrix(1, true, r, row, file, line);
}
inline void ldmatrix_x2_trans(unsigned (&r)[2], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  ldmatrix(2, true, r, row, file, line);
}
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  ldmatrix(4, true, r, row, file, line);
}
inline void cp_async_16(void* smem_dst, const void* gmem_src, unsigned src_bytes = 16,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  cp_async_issue(smem_dst, gmem_src, src_bytes, file, line);
}
template <int N>
inline void cp_async_wait() {
  cp_async_wait(N);
}

template <int N>
inline void wgmma_fence_operands(float (&)[N]) {}
template <int N>
inline void setmaxnreg_dec() {}
template <int N>
inline void setmaxnreg_inc() {}
template <class Map>
inline void tma_load_3d(void* dst, const Map* map, int x, int y, int z, unsigned long long* bar,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  const int coords[3] = {x, y, z};
  tma_load(dst, map, 3, coords, bar, file, line);
}
template <int N>
inline void wgmma_wait() {
  wgmma_wait_group(N);
}
template <int TRANS_A, int TRANS_B>
inline void wgmma_m64n256k16_bf16(float (&d)[128], unsigned long long desc_a, unsigned long long desc_b,
                                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  wgmma_issue(256, true, TRANS_A, TRANS_B, d, desc_a, desc_b, file, line);
}
template <int TRANS_A, int TRANS_B>
inline void wgmma_m64n256k16_f16(float (&d)[128], unsigned long long desc_a, unsigned long long desc_b,
                                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  wgmma_issue(256, false, TRANS_A, TRANS_B, d, desc_a, desc_b, file, line);
}

// The argument array holds 8-byte-aligned copies; parameters such as a 64-byte-aligned TensorMap
// are copied out byte-wise.
template <class T>
inline T load_arg(const void* p) {
  T v;
  std::memcpy(static_cast<void*>(&v), p, sizeof(T));
  return v;
}
template <class... P, size_t... I>
inline std::tuple<std::decay_t<P>...> load_args(void** args, std::index_sequence<I...>) {
  return std::tuple<std::decay_t<P>...>(load_arg<std::decay_t<P>>(args[I])...);
}

// cuLaunchKernel semantics: args[i] points at the i-th parameter; parameters are copied once at
// launch and every thread receives its own by-value copy.
template <class... P>
inline int launch(void (*kernel)(P...), Dim3 grid, Dim3 block, unsigned smem, void** args,
                  const LaunchOptions* opt, char* err, size_t errlen) {
  using Saved = std::tuple<std::decay_t<P>...>;
  Saved saved = load_args<P...>(args, std::index_sequence_for<P...>{});
  struct Ctx {
    void (*kernel)(P...);
    Saved* saved;
  } ctx{kernel, &saved};
  auto body = [](void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply([x](auto... a) { x->kernel(a...); }, *x->saved);
  };
  return run_grid(grid, block, smem, opt, body, &ctx, err, errlen);
}

}  // namespace emu

// ---------------------------------------------------------------- CUDA built-ins
inline void __syncthreads_at(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  emu::syncthreads(file, line);
}
#define __syncthreads() __syncthreads_at()
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  emu::syncwarp(mask, file, line);
}

template <class T>
inline T emu_shfl(emu::ShflKind kind, unsigned mask, T v, int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= 16 && std::is_trivially_copyable<T>::value, "shuffle of an unsupported type");
  T r;
  emu::shfl(kind, mask, &v, &r, sizeof(T), arg, width, file, line);
  return r;
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32, const char* file = __builtin_FILE(),
                     int line = __builtin_LINE()) {
  return emu_shfl(emu::ShflKind::Idx, mask, v, src_lane, width, file, line);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32, const char* file = __builtin_FILE(),
                         int line = __builtin_LINE()) {
  return emu_shfl(emu::ShflKind::Xor, mask, v, lane_mask, width, file, line);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                          int line = __builtin_LINE()) {
  return emu_shfl(emu::ShflKind::Down, mask, v, int(delta), width, file, line);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
  return emu_shfl(emu::ShflKind::Up, mask, v, int(delta), width, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  return emu::ballot(mask, pred, file, line);
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return emu::ballot(mask, pred, file, line) == mask;
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return emu::ballot(mask, pred, file, line) != 0;
}

// ---------------------------------------------------------------- shared memory
// EMU_SHARED gives each block its own array from a per-block arena that is filled with 0xFF (NaN in
// every float type) at block start, with red zones between arrays: reads before writes and overflows
// show up as NaN, and under AddressSanitizer as a report at the faulting line.
#define EMU_SHARED(T, name, dims)                             \
  typedef T name##_emu_type dims;                             \
  static thread_local ::emu::SharedSlot name##_emu_slot;      \
  name##_emu_type& name = *static_cast<name##_emu_type*>(     \
      ::emu::block_shared(name##_emu_slot, sizeof(name##_emu_type), alignof(name##_emu_type)))
#define EMU_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::emu::dyn_smem())
