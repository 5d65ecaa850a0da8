// The virtual GPU runtime: fibers, the block scheduler, barriers, warp collectives, and the
// emulation of mma.sync, ldmatrix, cp.async, wgmma, mbarrier and TMA loads. Built once by build.rs
// beside the kernels.
//
// Checks that turn GPU bugs into errors the Rust side can report (never a hang):
//   - shared memory (static arena and dynamic) is filled with 0xFF at every block start;
//   - strict barriers: a thread that exited does not count as arrived; barriers at different
//     source lines are divergence; nothing runnable is a deadlock, reported with the waiters;
//   - warp collectives check that all lanes of the mask arrive at the same operation and line;
//   - cp.async data lands only at wait_group; ldmatrix and cp.async check alignment and that the
//     addresses are in shared memory;
//   - wgmma results land only at wgmma.wait_group; a wgmma needs a wgmma.fence since the thread's
//     last wait; its accumulators and the shared memory it read must not change before the wait;
//     it must not read shared memory that a thread filled by cp.async and has not published to
//     the async proxy with fence.proxy.async, nor memory changed by ordinary stores after the
//     block's last fence.proxy.async (any thread's fence counts: lenient, but a missing one shows);
//   - TMA loads land when a thread first waits for their mbarrier's phase; waits that can never
//     complete end as a deadlock report, and loads never waited for, uninitialised mbarriers and
//     surplus arrivals are errors;
//   - with a seed, the order in which ready fibers run is shuffled, so a missing barrier shows up
//     as a wrong answer.
#include "common.cuh"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstdarg>
#include <cstdio>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif

#if defined(__x86_64__)
// Minimal SysV x86-64 context switch: callee-saved registers, MXCSR and the x87 control word.
// ucontext's swapcontext makes a sigprocmask system call on every switch (about 15x slower).
extern "C" void emu_ctx_switch(void** save_sp, void* load_sp);
extern "C" void emu_fiber_trampoline();
asm(R"(
  .text
  .globl emu_ctx_switch
  .hidden emu_ctx_switch
  .type emu_ctx_switch,@function
emu_ctx_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_ctx_switch,.-emu_ctx_switch
  .globl emu_fiber_trampoline
  .hidden emu_fiber_trampoline
  .type emu_fiber_trampoline,@function
emu_fiber_trampoline:
  .cfi_startproc
  .cfi_undefined rip
  call emu_fiber_entry
  ud2
  .cfi_endproc
  .size emu_fiber_trampoline,.-emu_fiber_trampoline
)");
#define EMU_FAST_SWITCH 1
#endif

namespace emu {
namespace {

constexpr unsigned char kPoison = 0xFF;  // 0xFFFFFFFF is NaN in f32, 0xFFFF NaN in f16 and bf16
constexpr size_t kRedZone = 64;
constexpr size_t kStaticSharedLimit = 48 * 1024;
constexpr size_t kDynamicSharedLimit = 227 * 1024;
constexpr size_t kArenaBytes = kStaticSharedLimit + 64 * kRedZone + 1024;
// Shared-window address of the first byte of dynamic shared memory (`smem_u32`). Deliberately not
// 1024-aligned: kernels that need aligned swizzle atoms must align it themselves, as on the GPU,
// where nothing promises more than 16 bytes.
constexpr unsigned kDynWindow = 0x480;

enum class FiberState : unsigned char { Ready, AtBarrier, AtWarp, AtMbarrier, Done };
enum class WarpOp : unsigned char { None, Sync, Shfl, Ballot, Mma, Ldmatrix, Wgmma };

const char* op_name(WarpOp op) {
  switch (op) {
    case WarpOp::Sync: return "__syncwarp";
    case WarpOp::Shfl: return "a shuffle";
    case WarpOp::Ballot: return "a vote";
    case WarpOp::Mma: return "mma.sync";
    case WarpOp::Ldmatrix: return "ldmatrix";
    case WarpOp::Wgmma: return "wgmma.mma_async";
    default: return "nothing";
  }
}

struct PendingCopy {
  void* dst;
  const void* src;
  unsigned src_bytes;
  unsigned group;
};

// One wgmma of a warpgroup: the whole 64 x n product, computed when the last thread issues it and
// added to each thread's accumulator fragment at that thread's wgmma.wait_group.
struct WgmmaOp {
  unsigned n = 0;
  std::vector<double> product;  // 64 x n, row-major
  // every shared-memory element the operands were read from, with its value then
  std::vector<std::pair<const uint16_t*, uint16_t>> inputs;
  const char* file = "";
  int line = 0;
  unsigned unretired = 128;  // threads that have not waited for it yet
};

struct PendingWgmma {
  std::shared_ptr<WgmmaOp> op;
  unsigned group;
  float* d;                 // the issuing thread's accumulator fragment
  std::vector<float> d_in;  // its value at issue, to catch writes before the wait
};

// A warpgroup (128 consecutive threads) gathering at one wgmma.
struct WarpgroupState {
  unsigned arrived = 0;
  std::shared_ptr<WgmmaOp> op;
  unsigned n = 0;
  bool bf16 = false, trans_a = false, trans_b = false;
  unsigned long long desc_a = 0, desc_b = 0;
  const char* file = "";
  int line = 0;
};

// The virtual GPU's tensor map (the 128 bytes of `TensorMap`, filled by `emu_encode_tensor_map`):
// a tiled view of a global tensor of 16-bit elements with up to
// 3 dimensions, innermost first, its boxes written to shared memory with the 128-byte swizzle.
struct TensorMapEmu {
  unsigned long long magic;  // kTensorMapMagic
  unsigned long long address;
  unsigned long long rank;
  unsigned long long dims[3];
  unsigned long long strides[3];  // bytes; strides[0] is the element size
  unsigned long long box[3];
  unsigned long long pad[4];
};
static_assert(sizeof(TensorMapEmu) == 128, "TensorMap is 128 bytes");
constexpr unsigned long long kTensorMapMagic = 0x7670752d746d6170ull;  // "vpu-tmap"

struct PendingTma {
  unsigned dst;  // shared-window address
  TensorMapEmu map;
  int coords[3];
  const char* file;
  int line;
};

// An mbarrier: arrivals and transaction bytes still expected in the current phase, and the
// TMA loads that complete on it (they land when a thread first waits for the phase).
struct Mbarrier {
  unsigned count = 0, pending = 0, phase = 0;
  long long tx = 0;
  std::vector<PendingTma> loads;
};

struct Fiber {
  void* sp = nullptr;
  ucontext_t ctx;
  char* stack = nullptr;
  size_t stack_size = 0;
  uint3 tid{};
  unsigned linear = 0, lane = 0, warp = 0;
  FiberState st = FiberState::Ready;
  // where the fiber waits while st == AtWarp, for deadlock reports
  WarpOp wait_op = WarpOp::None;
  const char* wait_file = "";
  int wait_line = 0;
  unsigned wait_mbarrier = 0, wait_parity = 0;  // while st == AtMbarrier
  std::vector<PendingCopy> copies;
  unsigned committed = 0;
  std::vector<PendingWgmma> wgmmas;
  unsigned wgmma_committed = 0;
  bool wgmma_fenced = false;
  // dynamic shared memory chunks (16 bytes) this thread filled by cp.async since its last
  // fence.proxy.async
  std::vector<size_t> unfenced_chunks;
#ifdef EMU_ASAN
  void* fake_stack = nullptr;
#endif
};

// The lanes of `mask` that have arrived at one warp collective.
struct Rendezvous {
  unsigned mask, arrived;
  WarpOp op;
  int aux;
  const char* file;
  int line;
};

struct WarpState {
  unsigned exited = 0;  // lanes that exited or do not exist (partial warp)
  // Collectives in progress. Several can be, with different masks: lanes 0-15 in a ballot over
  // 0x0000ffff while lanes 16-31 already wait in a full-warp __syncwarp is legal CUDA.
  std::vector<Rendezvous> pending;
  // Per-lane payload and result. A lane is in at most one collective at a time and reads its
  // result before it can arrive at the next one, so one slot per lane suffices.
  alignas(16) unsigned char in[32][48];
  alignas(16) unsigned char out[32][16];
};

struct Block {
  uint3 bidx{}, bdim{}, gdim{};
  unsigned n = 0, nwarps = 0, live = 0;
  std::vector<Fiber> f;
  std::vector<WarpState> w;
  std::vector<WarpgroupState> wg;
  std::vector<std::pair<unsigned, Mbarrier>> mbarriers;  // by shared-window address
  // per 16-byte chunk of dynamic shared memory: 1 + the thread that filled it by cp.async and has
  // not run fence.proxy.async since, or 0
  std::vector<unsigned> unfenced_writer;
  // Dynamic shared memory as the async proxy (wgmma) may see it: TMA writes land here too, and a
  // fence.proxy.async by any thread copies all of shared memory here. A wgmma operand that differs
  // was stored by the generic proxy (ordinary stores) with no fence after.
  std::vector<unsigned char> async_view;
  std::vector<unsigned> ready;
  size_t ready_head = 0;
  unsigned bar_arrived = 0;
  const char* bar_file = "";
  int bar_line = 0;
  void* sched_sp = nullptr;
  ucontext_t sched;
  Fiber* cur = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  const LaunchOptions* opt = nullptr;
  std::vector<unsigned char> dyn_buf, arena;
  unsigned char* dyn = nullptr;
  size_t dyn_bytes = 0, arena_top = 0, static_bytes = 0;
  unsigned long long serial = 0, rng = 0;
  bool failed = false;
  std::string error;
#ifdef EMU_ASAN
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
  void* main_fake_stack = nullptr;
#endif

  unsigned long long next_rand() {  // xorshift64*
    rng ^= rng >> 12;
    rng ^= rng << 25;
    rng ^= rng >> 27;
    return rng * 2685821657736338717ull;
  }
  bool in_shared(const void* p, size_t bytes) const {
    auto a = reinterpret_cast<const unsigned char*>(p);
    return (a >= arena.data() && a + bytes <= arena.data() + arena.size()) || (a >= dyn && a + bytes <= dyn + dyn_bytes);
  }
};

thread_local Block* tl_block = nullptr;
std::atomic<unsigned long long> g_block_serial{0};

std::string vformat(const char* fmt, va_list ap) {
  char buf[2048];
  vsnprintf(buf, sizeof buf, fmt, ap);
  return buf;
}
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  std::string s = vformat(fmt, ap);
  va_end(ap);
  return s;
}

// ---------------------------------------------------------------- fiber stacks
// Each stack has a PROT_NONE guard page below it, so an overflow faults instead of corrupting.
struct StackPool {
  std::vector<std::pair<char*, size_t>> stacks;
  char* get(unsigned i, size_t bytes) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    while (stacks.size() <= i) stacks.push_back({nullptr, 0});
    if (stacks[i].second != bytes) {
      if (stacks[i].first) munmap(stacks[i].first - page, stacks[i].second + page);
      void* p = mmap(nullptr, bytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) return nullptr;
      mprotect(p, page, PROT_NONE);
      stacks[i] = {static_cast<char*>(p) + page, bytes};
    }
    return stacks[i].first;
  }
};

// Stack pools and block states outlive launches (mapping 1024 stacks per launch would dominate
// small kernels, and worker threads are started per launch); a worker borrows one of each for the
// duration of a launch. The lists are never destroyed, so that the pooled objects stay reachable
// for LeakSanitizer, which checks after static destructors have run.
std::mutex g_pool_mutex;
std::vector<StackPool*>& g_free_pools = *new std::vector<StackPool*>();
std::vector<Block*>& g_free_blocks = *new std::vector<Block*>();

template <class T>
T* borrow(std::vector<T*>& list) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  if (list.empty()) return new T();
  T* p = list.back();
  list.pop_back();
  return p;
}
template <class T>
void give_back(std::vector<T*>& list, T* p) {
  std::lock_guard<std::mutex> lock(g_pool_mutex);
  list.push_back(p);
}

// ---------------------------------------------------------------- switching
void switch_to_fiber(Block* b, Fiber* fb) {
  b->cur = fb;
  threadIdx = fb->tid;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(&b->main_fake_stack, fb->stack, fb->stack_size);
#endif
#ifdef EMU_FAST_SWITCH
  emu_ctx_switch(&b->sched_sp, fb->sp);
#else
  swapcontext(&b->sched, &fb->ctx);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(b->main_fake_stack, nullptr, nullptr);
#endif
}

// Runs on a fiber: hands control back to the scheduler. After a final switch the fiber is never
// resumed, and ASan frees its fake stack.
void yield_to_sched(Block* b, bool final_switch) {
  Fiber* me = b->cur;
#ifdef EMU_ASAN
  __sanitizer_start_switch_fiber(final_switch ? nullptr : &me->fake_stack, b->main_stack_bottom, b->main_stack_size);
#else
  (void)final_switch;
#endif
#ifdef EMU_FAST_SWITCH
  emu_ctx_switch(&me->sp, b->sched_sp);
#else
  swapcontext(&me->ctx, &b->sched);
#endif
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(me->fake_stack, nullptr, nullptr);
#endif
}

void fiber_main() {
  Block* b = tl_block;
#ifdef EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b->main_stack_bottom, &b->main_stack_size);
#endif
  b->body(b->ctx);
  Fiber* me = b->cur;
  if (!me->copies.empty()) {
    fail("thread %u exited with %zu cp.async copies it never waited for", me->linear, me->copies.size());
  }
  if (!me->wgmmas.empty()) {
    fail("thread %u exited with %zu wgmma operation(s) it never waited for (first issued at %s:%d)", me->linear,
         me->wgmmas.size(), me->wgmmas[0].op->file, me->wgmmas[0].op->line);
  }
  WarpState& ws = b->w[me->warp];
  for (const Rendezvous& r : ws.pending) {
    if (r.mask >> me->lane & 1u)
      fail("thread %u (warp %u lane %u) exited while its warp waits for it in %s at %s:%d", me->linear, me->warp,
           me->lane, op_name(r.op), r.file, r.line);
  }
  ws.exited |= 1u << me->lane;
  me->st = FiberState::Done;
  b->live--;
  yield_to_sched(b, true);
  // Never resumed. This function must not end in a [[noreturn]] call: GCC would then treat it as
  // noreturn and ASan would unpoison the stack before the fiber switch completes.
}

}  // namespace
}  // namespace emu

extern "C" __attribute__((used)) void emu_fiber_entry() { emu::fiber_main(); }

namespace emu {
namespace {

void make_ready(Block* b, unsigned i) {
  b->f[i].st = FiberState::Ready;
  b->ready.push_back(i);
}

void shuffle_tail(Block* b, size_t from) {
  if (!b->opt->seed) return;
  for (size_t i = b->ready.size(); i > from + 1; --i) {
    size_t j = from + b->next_rand() % (i - from);
    std::swap(b->ready[i - 1], b->ready[j]);
  }
}

// Lists ranges of threads with the same wait state, for deadlock reports.
std::string describe_waiters(Block* b) {
  std::string s;
  auto where = [&](const Fiber& fb) -> std::string {
    switch (fb.st) {
      case FiberState::AtBarrier: return format("wait in __syncthreads at %s:%d", b->bar_file, b->bar_line);
      case FiberState::AtWarp: return format("wait in %s at %s:%d", op_name(fb.wait_op), fb.wait_file, fb.wait_line);
      case FiberState::AtMbarrier:
        return format("wait on the mbarrier at shared 0x%x for phase parity %u at %s:%d", fb.wait_mbarrier,
                      fb.wait_parity, fb.wait_file, fb.wait_line);
      case FiberState::Done: return "exited";
      default: return "ready";
    }
  };
  unsigned start = 0;
  std::string cur = b->n ? where(b->f[0]) : "";
  for (unsigned i = 1; i <= b->n; ++i) {
    std::string next = i < b->n ? where(b->f[i]) : "";
    if (i == b->n || next != cur) {
      s += format("; threads %u-%u %s", start, i - 1, cur.c_str());
      start = i;
      cur = next;
    }
  }
  return s;
}

bool run_block(Block* b) {
  b->live = b->n;
  b->ready.clear();
  b->ready_head = 0;
  b->bar_arrived = 0;
  b->failed = false;
  for (unsigned i = 0; i < b->n; ++i) {
    Fiber& fb = b->f[i];
    fb.st = FiberState::Ready;
    fb.copies.clear();
    fb.committed = 0;
    fb.wgmmas.clear();
    fb.wgmma_committed = 0;
    fb.wgmma_fenced = false;
    fb.unfenced_chunks.clear();
#ifdef EMU_FAST_SWITCH
    uintptr_t top = (reinterpret_cast<uintptr_t>(fb.stack) + fb.stack_size) & ~uintptr_t(15);
    void** frame = reinterpret_cast<void**>(top);
    frame[-1] = reinterpret_cast<void*>(&emu_fiber_trampoline);  // 'ret' target; rsp%16==0 after it
    for (int k = 2; k <= 7; ++k) frame[-k] = nullptr;            // rbp rbx r12 r13 r14 r15
    uint32_t* control = reinterpret_cast<uint32_t*>(&frame[-8]);
    control[0] = 0x1F80;  // default MXCSR
    control[1] = 0x037F;  // default x87 control word
    fb.sp = &frame[-8];
#else
    getcontext(&fb.ctx);
    fb.ctx.uc_stack.ss_sp = fb.stack;
    fb.ctx.uc_stack.ss_size = fb.stack_size;
    fb.ctx.uc_link = nullptr;
    makecontext(&fb.ctx, reinterpret_cast<void (*)()>(&emu_fiber_entry), 0);
#endif
    b->ready.push_back(i);
  }
  shuffle_tail(b, 0);
  for (;;) {
    while (b->ready_head < b->ready.size()) {
      if (b->opt->seed) {  // any ready fiber may run next, so every interleaving of yield points is reachable
        size_t j = b->ready_head + b->next_rand() % (b->ready.size() - b->ready_head);
        std::swap(b->ready[b->ready_head], b->ready[j]);
      }
      unsigned i = b->ready[b->ready_head++];
      switch_to_fiber(b, &b->f[i]);
      if (b->failed) return false;
    }
    b->ready.clear();
    b->ready_head = 0;
    if (b->live == 0) {
      for (const auto& [addr, bar] : b->mbarriers)
        if (!bar.loads.empty()) {
          b->error = format("block (%u,%u,%u): the TMA load issued at %s:%d never completed: no thread waited on its "
                            "mbarrier (shared 0x%x)",
                            b->bidx.x, b->bidx.y, b->bidx.z, bar.loads[0].file, bar.loads[0].line, addr);
          return false;
        }
      return true;
    }
    unsigned at_barrier = 0;
    for (unsigned i = 0; i < b->n; ++i) at_barrier += b->f[i].st == FiberState::AtBarrier;
    const bool exited = b->live != b->n;
    if (at_barrier == b->live && !(exited && !b->opt->lenient_barrier)) {
      b->bar_arrived = 0;
      for (unsigned i = 0; i < b->n; ++i)
        if (b->f[i].st == FiberState::AtBarrier) make_ready(b, i);
      shuffle_tail(b, 0);
      continue;
    }
    if (at_barrier == b->live) {
      b->error = format("block (%u,%u,%u): %u of %u threads exited without reaching __syncthreads at %s:%d%s",
                        b->bidx.x, b->bidx.y, b->bidx.z, b->n - b->live, b->n, b->bar_file, b->bar_line,
                        describe_waiters(b).c_str());
    } else {
      b->error = format("deadlock in block (%u,%u,%u): no thread can run%s", b->bidx.x, b->bidx.y, b->bidx.z,
                        describe_waiters(b).c_str());
    }
    return false;
  }
}

struct LaunchState {
  Dim3 grid, block;
  unsigned smem;
  const LaunchOptions* opt;
  void (*body)(void*);
  void* ctx;
  unsigned long long total;
  std::atomic<unsigned long long> next{0};
  std::atomic<bool> failed{false};
  std::mutex error_mutex;
  std::string error;
};

void run_blocks(LaunchState& L) {
  Block* b = borrow(g_free_blocks);
  StackPool* pool = borrow(g_free_pools);
  tl_block = b;
  b->bdim = uint3{L.block.x, L.block.y, L.block.z};
  b->gdim = uint3{L.grid.x, L.grid.y, L.grid.z};
  b->n = L.block.x * L.block.y * L.block.z;
  b->nwarps = (b->n + 31) / 32;
  b->body = L.body;
  b->ctx = L.ctx;
  b->opt = L.opt;
  if (b->f.size() < b->n) b->f.resize(b->n);
  b->w.resize(b->nwarps);
  for (unsigned i = 0; i < b->n; ++i) {
    Fiber& fb = b->f[i];
    fb.linear = i;
    fb.tid = uint3{i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y)};
    fb.lane = i % 32;
    fb.warp = i / 32;
    fb.stack_size = L.opt->stack_bytes;
    fb.stack = pool->get(i, fb.stack_size);
    if (!fb.stack) {
      std::lock_guard<std::mutex> lock(L.error_mutex);
      L.error = format("cannot map %u fiber stacks of %u bytes", b->n, L.opt->stack_bytes);
      L.failed = true;
      give_back(g_free_pools, pool);
      give_back(g_free_blocks, b);
      tl_block = nullptr;
      return;
    }
  }
  blockDim = b->bdim;
  gridDim = b->gdim;
  b->dyn_buf.resize(L.smem + 128 + kRedZone);
  b->dyn = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(b->dyn_buf.data()) + 127) & ~uintptr_t(127));
  b->dyn_bytes = L.smem;
  b->arena.resize(kArenaBytes);
  for (unsigned long long id; !L.failed && (id = L.next.fetch_add(1)) < L.total;) {
    b->bidx = uint3{unsigned(id % L.grid.x), unsigned((id / L.grid.x) % L.grid.y),
                    unsigned(id / (static_cast<unsigned long long>(L.grid.x) * L.grid.y))};
    blockIdx = b->bidx;
    b->serial = ++g_block_serial;
    b->rng = (L.opt->seed * 0x9E3779B97F4A7C15ull) ^ (id + 1) * 0xD1B54A32D192ED03ull;
    for (unsigned wi = 0; wi < b->nwarps; ++wi) {
      WarpState& ws = b->w[wi];
      const unsigned lanes = std::min(32u, b->n - wi * 32);
      ws.exited = lanes == 32 ? 0u : ~0u << lanes;  // lanes of a partial warp that do not exist
      ws.pending.clear();
    }
    b->arena_top = 0;
    b->static_bytes = 0;
    b->wg.assign(b->n / 128, WarpgroupState{});
    b->mbarriers.clear();
    b->unfenced_writer.assign((b->dyn_bytes + 15) / 16, 0u);
    b->async_view.assign(b->dyn_bytes, kPoison);
#ifdef EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(b->arena.data(), b->arena.size());
    ASAN_UNPOISON_MEMORY_REGION(b->dyn, b->dyn_bytes + kRedZone);
#endif
    std::memset(b->dyn, kPoison, b->dyn_bytes + kRedZone);
    std::memset(b->arena.data(), kPoison, b->arena.size());
#ifdef EMU_ASAN
    ASAN_POISON_MEMORY_REGION(b->arena.data(), b->arena.size());
    ASAN_POISON_MEMORY_REGION(b->dyn + b->dyn_bytes, kRedZone);
#endif
    if (!run_block(b)) {
#ifdef EMU_ASAN
      // The fibers of a failed block never return, so their frames' red zones stay poisoned on
      // stacks the next block reuses.
      for (unsigned i = 0; i < b->n; ++i) ASAN_UNPOISON_MEMORY_REGION(b->f[i].stack, b->f[i].stack_size);
#endif
      std::lock_guard<std::mutex> lock(L.error_mutex);
      if (!L.failed) L.error = b->error;
      L.failed = true;
    }
  }
#ifdef EMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(b->arena.data(), b->arena.size());
  ASAN_UNPOISON_MEMORY_REGION(b->dyn, b->dyn_bytes + kRedZone);
#endif
  give_back(g_free_pools, pool);
  give_back(g_free_blocks, b);
  tl_block = nullptr;
}

void write_error(char* err, size_t errlen, const std::string& msg) {
  if (errlen == 0) return;
  std::snprintf(err, errlen, "%s", msg.c_str());
}

// ---------------------------------------------------------------- warp collectives
// Every lane of the mask deposits its payload and parks; the last lane to arrive computes all
// lanes' results while the others are parked (a snapshot, which matters for ldmatrix), then
// wakes them. Lanes that wait in the same collective with the same mask must be at the same
// operation and source line (__syncwarp excepted: on sm_70+ it may be reached from different
// lines); other mismatches that cannot resolve end as a deadlock report.
template <class Leader>
const unsigned char* collective(WarpOp op, int aux, unsigned mask, const char* file, int line, const void* in,
                                size_t in_bytes, Leader&& leader) {
  Block* b = tl_block;
  Fiber* me = b->cur;
  WarpState& ws = b->w[me->warp];
  if (!(mask >> me->lane & 1u))
    fail("lane %u of warp %u calls %s at %s:%d with mask 0x%08x that excludes itself", me->lane, me->warp,
         op_name(op), file, line, mask);
  if (mask & ws.exited)
    fail("%s at %s:%d: mask 0x%08x names lanes that exited or do not exist (0x%08x) in warp %u", op_name(op), file,
         line, mask, mask & ws.exited, me->warp);
  size_t gi = 0;
  while (gi < ws.pending.size() && ws.pending[gi].mask != mask) ++gi;
  if (gi == ws.pending.size()) {
    ws.pending.push_back(Rendezvous{mask, 0u, op, aux, file, line});
  } else {
    const Rendezvous& r = ws.pending[gi];
    if (r.op != op || r.aux != aux || (op != WarpOp::Sync && (r.line != line || std::strcmp(r.file, file))))
      fail("divergent warp collective in warp %u: lane %u at %s (%s:%d, mask 0x%08x) while other lanes wait in %s "
           "(%s:%d, same mask)",
           me->warp, me->lane, op_name(op), file, line, mask, op_name(r.op), r.file, r.line);
  }
  std::memcpy(ws.in[me->lane], in, in_bytes);
  ws.pending[gi].arrived |= 1u << me->lane;
  if (ws.pending[gi].arrived == mask) {
    const Rendezvous done = ws.pending[gi];
    ws.pending.erase(ws.pending.begin() + gi);
    leader(done, ws);
    const size_t from = std::max(b->ready.size(), b->ready_head);
    for (unsigned l = 0; l < 32; ++l) {
      if (l == me->lane || !(mask >> l & 1u)) continue;
      make_ready(b, me->warp * 32 + l);
    }
    shuffle_tail(b, from);
  } else {
    me->st = FiberState::AtWarp;
    me->wait_op = op;
    me->wait_file = file;
    me->wait_line = line;
    yield_to_sched(b, false);
  }
  return ws.out[me->lane];
}

float half_lo(bool bf16_type, unsigned w) {
  return bf16_type ? bf16_to_f32(bf16{(unsigned short)(w & 0xffff)}) : f16_to_f32(f16{(unsigned short)(w & 0xffff)});
}
float half_hi(bool bf16_type, unsigned w) {
  return bf16_type ? bf16_to_f32(bf16{(unsigned short)(w >> 16)}) : f16_to_f32(f16{(unsigned short)(w >> 16)});
}

struct MmaIn {
  unsigned a[4];
  unsigned b[2];
  float c[4];
};

}  // namespace

// ---------------------------------------------------------------- public runtime API
void fail(const char* fmt, ...) {
  Block* b = tl_block;
  {  // the message must not outlive this scope: the fiber's stack is abandoned below
    va_list ap;
    va_start(ap, fmt);
    std::string msg = vformat(fmt, ap);
    va_end(ap);
    if (!b || !b->cur) {
      std::fprintf(stderr, "[vgpu] fatal outside a kernel thread: %s\n", msg.c_str());
      std::abort();
    }
    Fiber* me = b->cur;
    b->error = format("block (%u,%u,%u) thread (%u,%u,%u): %s", b->bidx.x, b->bidx.y, b->bidx.z, me->tid.x, me->tid.y,
                      me->tid.z, msg.c_str());
  }
  b->failed = true;
  yield_to_sched(b, true);
  std::abort();  // unreachable: the scheduler never resumes a failed block
}

void syncthreads(const char* file, int line) {
  Block* b = tl_block;
  if (b->bar_arrived == 0) {
    b->bar_file = file;
    b->bar_line = line;
  } else if (b->bar_line != line || std::strcmp(b->bar_file, file)) {
    fail("divergent __syncthreads: this thread is at %s:%d while others wait at %s:%d", file, line, b->bar_file,
         b->bar_line);
  }
  b->bar_arrived++;
  b->cur->st = FiberState::AtBarrier;
  yield_to_sched(b, false);
}

void syncwarp(unsigned mask, const char* file, int line) {
  collective(WarpOp::Sync, 0, mask, file, line, nullptr, 0, [](const Rendezvous&, WarpState&) {});
}

void shfl(ShflKind kind, unsigned mask, const void* value, void* result, unsigned bytes, int arg, int width,
          const char* file, int line) {
  if (width <= 0 || width > 32 || (width & (width - 1)))
    fail("shuffle at %s:%d: width %d is not a power of two in [1, 32]", file, line, width);
  unsigned char payload[20];
  std::memcpy(payload, value, bytes);
  std::memcpy(payload + 16, &arg, 4);
  const unsigned char* out = collective(WarpOp::Shfl, int(kind) * 64 + width, mask, file, line, payload, sizeof payload,
                                        [&](const Rendezvous& g, WarpState& ws) {
                                          const unsigned w = unsigned(width);
                                          for (unsigned l = 0; l < 32; ++l) {
                                            if (!(g.mask >> l & 1u)) continue;
                                            int a;
                                            std::memcpy(&a, ws.in[l] + 16, 4);
                                            if (kind != ShflKind::Idx) a &= 31;  // shfl.sync reads b[4:0]
                                            const unsigned group = l & ~(w - 1);
                                            unsigned src = l;
                                            switch (kind) {
                                              case ShflKind::Idx: src = group + (unsigned(a) & (w - 1)); break;
                                              case ShflKind::Xor: {
                                                unsigned s = l ^ unsigned(a);
                                                src = s >= group + w ? l : s;  // later groups give one's own value
                                                break;
                                              }
                                              case ShflKind::Down:
                                                src = (l & (w - 1)) + unsigned(a) >= w ? l : l + unsigned(a);
                                                break;
                                              case ShflKind::Up: src = (l & (w - 1)) < unsigned(a) ? l : l - unsigned(a); break;
                                            }
                                            // reading a lane outside the mask is undefined on the GPU: poison
                                            if (src >= 32 || !(g.mask >> src & 1u))
                                              std::memset(ws.out[l], kPoison, bytes);
                                            else
                                              std::memcpy(ws.out[l], ws.in[src], bytes);
                                          }
                                        });
  std::memcpy(result, out, bytes);
}

unsigned ballot(unsigned mask, int pred, const char* file, int line) {
  const int p = pred != 0;
  const unsigned char* out = collective(WarpOp::Ballot, 0, mask, file, line, &p, sizeof p, [](const Rendezvous& g, WarpState& ws) {
    unsigned r = 0;
    for (unsigned l = 0; l < 32; ++l) {
      if (!(g.mask >> l & 1u)) continue;
      int x;
      std::memcpy(&x, ws.in[l], 4);
      r |= unsigned(x) << l;
    }
    for (unsigned l = 0; l < 32; ++l) std::memcpy(ws.out[l], &r, 4);
  });
  unsigned r;
  std::memcpy(&r, out, 4);
  return r;
}

// Fragment layouts (PTX ISA, mma.m16n8k16 with .f16/.bf16 inputs), g = lane>>2, t = lane%4:
//   A 16x16 row-major, a_i (i = 0..7, register i/2, low half = even i):
//       row = g + 8*((i>>1)&1), col = 2t + (i&1) + 8*(i>>2)
//   B 16x8 column-major, b_i (i = 0..3): row(k) = 2t + (i&1) + 8*(i>>1), col(n) = g
//   C/D 16x8 f32, c_i (i = 0..3): row = g + 8*(i>>1), col = 2t + (i&1)
// Products of 16-bit floats are exact in f32; the sum is formed in f64 and rounded once, so the
// result does not depend on the order (the hardware's own rounding differs slightly).
void mma_m16n8k16(bool bf16_type, float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4],
                  const char* file, int line) {
  MmaIn in;
  std::memcpy(in.a, a, sizeof in.a);
  std::memcpy(in.b, b, sizeof in.b);
  std::memcpy(in.c, c, sizeof in.c);
  if (tl_block->n - tl_block->cur->warp * 32 < 32)
    fail("mma.sync at %s:%d in a partial warp (blockDim %u)", file, line, tl_block->n);
  const unsigned char* out =
      collective(WarpOp::Mma, bf16_type, 0xffffffffu, file, line, &in, sizeof in, [bf16_type](const Rendezvous&, WarpState& ws) {
        float A[16][16], B[16][8];
        for (unsigned l = 0; l < 32; ++l) {
          MmaIn x;
          std::memcpy(&x, ws.in[l], sizeof x);
          const unsigned g = l >> 2, t = l & 3;
          for (unsigned i = 0; i < 8; ++i) {
            const unsigned w = x.a[i >> 1];
            A[g + 8 * ((i >> 1) & 1)][2 * t + (i & 1) + 8 * (i >> 2)] = (i & 1) ? half_hi(bf16_type, w) : half_lo(bf16_type, w);
          }
          for (unsigned i = 0; i < 4; ++i) {
            const unsigned w = x.b[i >> 1];
            B[2 * t + (i & 1) + 8 * (i >> 1)][g] = (i & 1) ? half_hi(bf16_type, w) : half_lo(bf16_type, w);
          }
        }
        for (unsigned l = 0; l < 32; ++l) {
          MmaIn x;
          std::memcpy(&x, ws.in[l], sizeof x);
          const unsigned g = l >> 2, t = l & 3;
          float r[4];
          for (unsigned i = 0; i < 4; ++i) {
            const unsigned row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
            double acc = x.c[i];
            for (unsigned k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
            r[i] = float(acc);
          }
          std::memcpy(ws.out[l], r, sizeof r);
        }
      });
  std::memcpy(d, out, 16);
}

// ldmatrix .m8n8 .xN .b16: lanes 8j..8j+7 give the row addresses of matrix j (j < N).
// Register j of lane l holds matrix j at (row l/4, cols 2(l%4), 2(l%4)+1), or with .trans at
// (rows 2(l%4), 2(l%4)+1, col l/4), the lower-indexed element in the low half.
void ldmatrix(unsigned count, bool trans, unsigned* r, const void* row, const char* file, int line) {
  if (tl_block->n - tl_block->cur->warp * 32 < 32)
    fail("ldmatrix at %s:%d in a partial warp (blockDim %u)", file, line, tl_block->n);
  const unsigned char* out = collective(
      WarpOp::Ldmatrix, int(count * 2 + trans), 0xffffffffu, file, line, &row, sizeof row,
      [count, trans, file, line](const Rendezvous&, WarpState& ws) {
        uint16_t m[32][8];
        for (unsigned a = 0; a < 8 * count; ++a) {
          const unsigned char* addr;
          std::memcpy(&addr, ws.in[a], sizeof addr);
          if (reinterpret_cast<uintptr_t>(addr) & 15)
            fail("ldmatrix at %s:%d: lane %u row address %p is not 16-byte aligned", file, line, a, (const void*)addr);
          if (!tl_block->in_shared(addr, 16))
            fail("ldmatrix at %s:%d: lane %u row address %p is not in shared memory", file, line, a, (const void*)addr);
          std::memcpy(m[a], addr, 16);  // one 16-byte row read per address, like the hardware
        }
        for (unsigned l = 0; l < 32; ++l) {
          unsigned regs[4] = {0, 0, 0, 0};
          for (unsigned j = 0; j < count; ++j) {
            uint16_t lo, hi;
            if (!trans) {
              lo = m[8 * j + l / 4][2 * (l % 4)];
              hi = m[8 * j + l / 4][2 * (l % 4) + 1];
            } else {
              lo = m[8 * j + 2 * (l % 4)][l / 4];
              hi = m[8 * j + 2 * (l % 4) + 1][l / 4];
            }
            regs[j] = unsigned(lo) | (unsigned(hi) << 16);
          }
          std::memcpy(ws.out[l], regs, sizeof regs);
        }
      });
  std::memcpy(r, out, 4 * count);
}

void cp_async_issue(void* dst, const void* src, unsigned src_bytes, const char* file, int line) {
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) & 15)
    fail("cp.async at %s:%d: addresses %p <- %p are not 16-byte aligned", file, line, dst, src);
  if (src_bytes > 16) fail("cp.async at %s:%d: source size %u exceeds 16", file, line, src_bytes);
  if (!tl_block->in_shared(dst, 16)) fail("cp.async at %s:%d: destination %p is not in shared memory", file, line, dst);
  std::memset(dst, kPoison, 16);  // the destination is undefined until the copy completes
  Fiber* me = tl_block->cur;
  me->copies.push_back({dst, src, src_bytes, me->committed});
}

void cp_async_commit() { tl_block->cur->committed++; }

void cp_async_wait(int n) {
  Fiber* me = tl_block->cur;
  // every committed group except the n most recent completes
  const unsigned limit = me->committed >= unsigned(n) ? me->committed - unsigned(n) : 0;
  size_t kept = 0;
  for (size_t i = 0; i < me->copies.size(); ++i) {
    const PendingCopy& c = me->copies[i];
    if (c.group < limit) {
      std::memcpy(c.dst, c.src, c.src_bytes);
      std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, 16 - c.src_bytes);
      Block* b = tl_block;
      const auto* dst = static_cast<const unsigned char*>(c.dst);
      if (dst >= b->dyn && dst < b->dyn + b->dyn_bytes) {
        const size_t chunk = size_t(dst - b->dyn) / 16;
        b->unfenced_writer[chunk] = me->linear + 1;
        me->unfenced_chunks.push_back(chunk);
      }
    } else {
      me->copies[kept++] = c;
    }
  }
  me->copies.resize(kept);
}

// ---------------------------------------------------------------- Hopper: wgmma
unsigned smem_u32(const void* p, const char* file, int line) {
  Block* b = tl_block;
  const auto* a = static_cast<const unsigned char*>(p);
  if (a < b->dyn || a > b->dyn + b->dyn_bytes)
    fail("smem_u32 at %s:%d: %p is not in dynamic shared memory (the only shared memory the virtual GPU maps "
         "into the shared window)",
         file, line, p);
  return kDynWindow + unsigned(a - b->dyn);
}

void fence_proxy_async() {
  Block* b = tl_block;
  Fiber* me = b->cur;
  for (size_t chunk : me->unfenced_chunks)
    if (b->unfenced_writer[chunk] == me->linear + 1) b->unfenced_writer[chunk] = 0;
  me->unfenced_chunks.clear();
  std::memcpy(b->async_view.data(), b->dyn, b->dyn_bytes);
}

void wgmma_fence() { tl_block->cur->wgmma_fenced = true; }

void wgmma_commit() { tl_block->cur->wgmma_committed++; }

namespace {

// The shared-memory element (row r along M or N, k) of a wgmma operand with 16-bit elements,
// through a matrix descriptor (PTX ISA "Matrix Descriptor"; layouts as CUTLASS's GMMA canonical
// forms). Only the 128-byte swizzle is emulated, the mode our kernels use. K-major: rows of 128
// bytes hold 64 k, 8 rows form a 1024-byte atom, SBO steps 8 rows. MN-major: rows of 128 bytes
// hold 64 consecutive m (or n) at one k, 8 k form an atom, LBO steps 64 m, SBO steps 8 k. The
// swizzle XORs address bits 4-6 (16-byte chunk) with bits 7-9 (row within the atom) of the
// shared-window address.
const uint16_t* wgmma_element(Block* b, unsigned long long desc, bool mn_major, unsigned r, unsigned k,
                              const char* file, int line) {
  const unsigned start = unsigned(desc & 0x3FFF) << 4;
  const unsigned lbo = unsigned((desc >> 16) & 0x3FFF) << 4;
  const unsigned sbo = unsigned((desc >> 32) & 0x3FFF) << 4;
  const unsigned base_offset = unsigned((desc >> 49) & 7);
  const unsigned swizzle = unsigned(desc >> 62);
  if (swizzle != 1)
    fail("wgmma at %s:%d: descriptor 0x%016llx has swizzle mode %u; the virtual GPU emulates only mode 1 (128B)",
         file, line, desc, swizzle);
  if (base_offset != 0)
    fail("wgmma at %s:%d: descriptor 0x%016llx has base offset %u; the virtual GPU emulates only 0", file, line, desc,
         base_offset);
  unsigned addr = mn_major ? start + (r / 64) * lbo + (k / 8) * sbo + (k % 8) * 128 + (r % 64) * 2
                           : start + (r / 8) * sbo + (r % 8) * 128 + k * 2;
  addr ^= ((addr >> 7) & 7) << 4;
  if (addr < kDynWindow || addr + 2 > kDynWindow + b->dyn_bytes)
    fail("wgmma at %s:%d: descriptor 0x%016llx reaches shared address 0x%x for element (%u, %u), outside the %zu "
         "bytes of dynamic shared memory at 0x%x",
         file, line, desc, addr, r, k, b->dyn_bytes, kDynWindow);
  const size_t offset = addr - kDynWindow;
  if (const unsigned writer = b->unfenced_writer[offset / 16])
    fail("wgmma at %s:%d reads shared memory (offset %zu) that thread %u filled by cp.async without a "
         "fence.proxy.async before publishing it: the tensor cores may read stale data",
         file, line, offset, writer - 1);
  if (std::memcmp(b->dyn + offset, b->async_view.data() + offset, 2) != 0)
    fail("wgmma at %s:%d reads shared memory (offset %zu) stored by the generic proxy (an ordinary store, or a "
         "cp.async not waited for) after the block's last fence.proxy.async: the tensor cores may read stale data",
         file, line, offset);
  return reinterpret_cast<const uint16_t*>(b->dyn + offset);
}

// The product of the warpgroup's operands, by the thread that completes the warpgroup's arrival.
// Nothing here owns heap memory on the fiber's stack: a failure abandons the stack.
void wgmma_compute(Block* b, const WarpgroupState& g, WgmmaOp& op) {
  op.n = g.n;
  op.file = g.file;
  op.line = g.line;
  auto value = [&](const uint16_t* p) {
    op.inputs.push_back({p, *p});
    return double(g.bf16 ? bf16_to_f32(bf16{*p}) : f16_to_f32(f16{*p}));
  };
  double a[64][16];
  for (unsigned m = 0; m < 64; ++m)
    for (unsigned k = 0; k < 16; ++k) a[m][k] = value(wgmma_element(b, g.desc_a, g.trans_a, m, k, g.file, g.line));
  op.product.assign(64 * size_t(g.n), 0.0);
  for (unsigned n = 0; n < g.n; ++n)
    for (unsigned k = 0; k < 16; ++k) {
      const double bv = value(wgmma_element(b, g.desc_b, g.trans_b, n, k, g.file, g.line));
      for (unsigned m = 0; m < 64; ++m) op.product[m * g.n + n] += a[m][k] * bv;
    }
}

}  // namespace

// A warpgroup collective: every thread of the 128 deposits its accumulator pointer and parks; the
// last to arrive reads the operands and computes the product; each thread's fragment receives it
// at that thread's wgmma.wait_group.
void wgmma_issue(unsigned n, bool bf16_type, bool trans_a, bool trans_b, float* d, unsigned long long desc_a,
                 unsigned long long desc_b, const char* file, int line) {
  Block* b = tl_block;
  Fiber* me = b->cur;
  if (b->n % 128)
    fail("wgmma at %s:%d: the block's %u threads are not whole warpgroups of 128", file, line, b->n);
  if (!me->wgmma_fenced)
    fail("wgmma at %s:%d without a wgmma.fence since this thread's last wgmma.wait_group", file, line);
  WarpgroupState& g = b->wg[me->linear / 128];
  if (g.arrived == 0) {
    g.op = std::make_shared<WgmmaOp>();
    g.n = n;
    g.bf16 = bf16_type;
    g.trans_a = trans_a;
    g.trans_b = trans_b;
    g.desc_a = desc_a;
    g.desc_b = desc_b;
    g.file = file;
    g.line = line;
  } else if (g.n != n || g.bf16 != bf16_type || g.trans_a != trans_a || g.trans_b != trans_b || g.desc_a != desc_a ||
             g.desc_b != desc_b || g.line != line || std::strcmp(g.file, file)) {
    fail("divergent wgmma in warpgroup %u: thread %u at %s:%d with descriptors 0x%llx, 0x%llx while others wait at "
         "%s:%d with 0x%llx, 0x%llx",
         me->linear / 128, me->linear, file, line, desc_a, desc_b, g.file, g.line, g.desc_a, g.desc_b);
  }
  me->wgmmas.push_back(PendingWgmma{g.op, me->wgmma_committed, d, std::vector<float>(d, d + n / 2)});
  if (++g.arrived < 128) {
    me->st = FiberState::AtWarp;
    me->wait_op = WarpOp::Wgmma;
    me->wait_file = file;
    me->wait_line = line;
    yield_to_sched(b, false);
    return;
  }
  g.arrived = 0;
  wgmma_compute(b, g, *g.op);  // g.op, not a local, owns the operation while it may fail
  g.op.reset();
  const size_t from = std::max(b->ready.size(), b->ready_head);
  const unsigned first = me->linear / 128 * 128;
  for (unsigned t = first; t < first + 128; ++t)
    if (t != me->linear) make_ready(b, t);
  shuffle_tail(b, from);
}

void wgmma_wait_group(int n) {
  Fiber* me = tl_block->cur;
  const unsigned limit = me->wgmma_committed >= unsigned(n) ? me->wgmma_committed - unsigned(n) : 0;
  const unsigned t = me->linear % 128, warp = t / 32, g = (t % 32) / 4, q = t % 4;
  size_t kept = 0;
  for (size_t e = 0; e < me->wgmmas.size(); ++e) {
    PendingWgmma& w = me->wgmmas[e];
    if (w.group >= limit) {
      if (kept != e) me->wgmmas[kept] = std::move(w);
      kept++;
      continue;
    }
    WgmmaOp& op = *w.op;
    const unsigned count = op.n / 2;
    if (std::memcmp(w.d, w.d_in.data(), count * sizeof(float)))
      fail("the accumulators of the wgmma issued at %s:%d were written before wgmma.wait_group retired it", op.file,
           op.line);
    // The wgmma is one operation of the warpgroup: once a thread's wait has retired it, its reads of
    // shared memory are over for all 128 threads, and a thread that waited may hand the stage on (one
    // thread per warpgroup does in CUTLASS, through an mbarrier, to TMA). So the first thread to
    // retire it checks that its operands stayed in place; the last one that no thread changed them
    // by ordinary stores since. (Stricter than the hardware for a thread that has waited and then
    // reuses the operands' memory before the other threads' waits: put a barrier in between.)
    if (op.unretired == 128 || op.unretired == 1) {
      Block* b = tl_block;
      for (const auto& in : op.inputs) {
        if (*in.first == in.second) continue;
        const size_t offset = size_t(reinterpret_cast<const unsigned char*>(in.first) - b->dyn);
        if (op.unretired == 128 || std::memcmp(b->dyn + offset, b->async_view.data() + offset, 2) != 0)
          fail("shared memory read by the wgmma issued at %s:%d was overwritten before %s wgmma.wait_group retired it",
               op.file, op.line, op.unretired == 128 ? "a" : "every thread's");
      }
    }
    op.unretired--;
    // accumulator fragment (PTX ISA, wgmma .m64nNk16 D): d[i] is row 16*warp + g + 8*((i>>1)&1),
    // column 8*(i>>2) + 2q + (i&1)
    for (unsigned i = 0; i < count; ++i) {
      const unsigned row = 16 * warp + g + 8 * ((i >> 1) & 1), col = 8 * (i >> 2) + 2 * q + (i & 1);
      w.d[i] = float(double(w.d[i]) + op.product[row * op.n + col]);
    }
    for (size_t later = e + 1; later < me->wgmmas.size(); ++later)
      if (me->wgmmas[later].d == w.d) me->wgmmas[later].d_in.assign(w.d, w.d + count);
  }
  me->wgmmas.resize(kept);
  me->wgmma_fenced = false;
}

// ---------------------------------------------------------------- Hopper: mbarrier and TMA
namespace {

Mbarrier& mbarrier_at(unsigned long long* bar, const char* what, const char* file, int line) {
  Block* b = tl_block;
  const unsigned addr = smem_u32(bar, file, line);
  for (auto& [a, m] : b->mbarriers)
    if (a == addr) return m;
  fail("%s at %s:%d on shared 0x%x, which holds no initialised mbarrier", what, file, line, addr);
}

// Lands the box of one TMA load in shared memory: elements outside the tensor read as zero, the
// box is laid out densely (x fastest) and 16-byte chunks are swizzled by address bits 7-9.
void tma_complete(Block* b, const PendingTma& t) {
  const TensorMapEmu& m = t.map;
  const unsigned long long bx = m.box[0], by = m.box[1], bz = m.box[2], elem = m.strides[0];
  for (unsigned long long z = 0; z < bz; ++z)
    for (unsigned long long y = 0; y < by; ++y)
      for (unsigned long long x = 0; x < bx; ++x) {
        const long long c[3] = {t.coords[0] + (long long)x, t.coords[1] + (long long)y, t.coords[2] + (long long)z};
        bool inside = true;
        unsigned long long src = m.address;
        for (unsigned d = 0; d < m.rank; ++d) {
          inside = inside && c[d] >= 0 && (unsigned long long)c[d] < m.dims[d];
          src += (unsigned long long)c[d] * m.strides[d];
        }
        unsigned addr = t.dst + unsigned(((z * by + y) * bx + x) * elem);
        addr ^= ((addr >> 7) & 7) << 4;
        unsigned char* dst = b->dyn + (addr - kDynWindow);
        if (inside)
          std::memcpy(dst, reinterpret_cast<const void*>(src), elem);
        else
          std::memset(dst, 0, elem);
        std::memcpy(b->async_view.data() + (addr - kDynWindow), dst, elem);  // an async-proxy write
      }
}

// Wakes the threads waiting on the mbarrier at `addr`: they check their phase again (and land
// pending TMA loads).
void wake_mbarrier_waiters(Block* b, unsigned addr) {
  const size_t from = std::max(b->ready.size(), b->ready_head);
  for (unsigned i = 0; i < b->n; ++i) {
    const Fiber& f = b->f[i];
    if (f.st == FiberState::AtMbarrier && f.wait_mbarrier == addr) make_ready(b, i);
  }
  shuffle_tail(b, from);
}

void mbarrier_complete_phase_if_done(Block* b, unsigned addr, Mbarrier& m) {
  if (m.pending || m.tx || !m.loads.empty()) return;
  m.phase++;
  m.pending = m.count;
  wake_mbarrier_waiters(b, addr);
}

void mbarrier_arrive_on(Mbarrier& m, unsigned addr, const char* file, int line) {
  if (m.pending == 0)
    fail("mbarrier arrive at %s:%d on shared 0x%x: more arrivals than the %u it was initialised with", file, line,
         addr, m.count);
  m.pending--;
  mbarrier_complete_phase_if_done(tl_block, addr, m);
}

}  // namespace

void mbarrier_init(unsigned long long* bar, unsigned count, const char* file, int line) {
  Block* b = tl_block;
  const unsigned addr = smem_u32(bar, file, line);
  if (addr & 7) fail("mbarrier.init at %s:%d: shared 0x%x is not 8-byte aligned", file, line, addr);
  if (count == 0) fail("mbarrier.init at %s:%d with an arrival count of 0", file, line);
  for (auto& [a, m] : b->mbarriers)
    if (a == addr) {
      m = Mbarrier{count, count, 0, 0, {}};
      return;
    }
  b->mbarriers.push_back({addr, Mbarrier{count, count, 0, 0, {}}});
}

void mbarrier_arrive(unsigned long long* bar, const char* file, int line) {
  mbarrier_arrive_on(mbarrier_at(bar, "mbarrier.arrive", file, line), smem_u32(bar, file, line), file, line);
}

void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes, const char* file, int line) {
  Mbarrier& m = mbarrier_at(bar, "mbarrier.arrive.expect_tx", file, line);
  m.tx += bytes;
  mbarrier_arrive_on(m, smem_u32(bar, file, line), file, line);
}

// try_wait.parity in a loop: returns once the phase with this parity has completed. The TMA loads
// pending on the barrier land now, the first time anyone needs them.
void mbarrier_wait(unsigned long long* bar, unsigned parity, const char* file, int line) {
  Block* b = tl_block;
  const unsigned addr = smem_u32(bar, file, line);
  for (;;) {
    Mbarrier& m = mbarrier_at(bar, "mbarrier.try_wait", file, line);
    if ((m.phase & 1) != (parity & 1)) return;
    if (!m.loads.empty()) {
      for (const PendingTma& t : m.loads) {
        tma_complete(b, t);
        m.tx -= (long long)(t.map.box[0] * t.map.box[1] * t.map.box[2] * t.map.strides[0]);
      }
      m.loads.clear();
      mbarrier_complete_phase_if_done(b, addr, m);
      continue;
    }
    Fiber* me = b->cur;
    me->st = FiberState::AtMbarrier;
    me->wait_mbarrier = addr;
    me->wait_parity = parity & 1;
    me->wait_file = file;
    me->wait_line = line;
    yield_to_sched(b, false);
  }
}

void tma_load(void* dst, const void* map, int rank, const int* coords, unsigned long long* bar, const char* file,
              int line) {
  Block* b = tl_block;
  PendingTma t;
  std::memcpy(&t.map, map, sizeof t.map);
  if (t.map.magic != kTensorMapMagic)
    fail("TMA load at %s:%d: the tensor map was not encoded for the virtual GPU", file, line);
  if (int(t.map.rank) != rank)
    fail("TMA load at %s:%d: a %d-D load with a %llu-D tensor map", file, line, rank, t.map.rank);
  t.dst = smem_u32(dst, file, line);
  if (t.dst & 1023)
    fail("TMA load at %s:%d: destination shared 0x%x is not 1024-byte aligned (128-byte swizzle)", file, line,
         t.dst);
  const unsigned long long bytes = t.map.box[0] * t.map.box[1] * t.map.box[2] * t.map.strides[0];
  if (t.dst + bytes > kDynWindow + b->dyn_bytes)
    fail("TMA load at %s:%d: a %llu-byte box at shared 0x%x overruns dynamic shared memory", file, line, bytes, t.dst);
  for (int d = 0; d < 3; ++d) t.coords[d] = d < rank ? coords[d] : 0;
  t.file = file;
  t.line = line;
  std::memset(b->dyn + (t.dst - kDynWindow), kPoison, bytes);  // undefined until the load completes
  std::memset(b->async_view.data() + (t.dst - kDynWindow), kPoison, bytes);
  mbarrier_at(bar, "TMA load", file, line).loads.push_back(t);
  wake_mbarrier_waiters(b, smem_u32(bar, file, line));
}

void* block_shared(SharedSlot& slot, size_t bytes, size_t align) {
  Block* b = tl_block;
  if (slot.serial != b->serial) {  // the first thread of this block to reach the declaration allocates
    const size_t a = align < 16 ? 16 : align;
    const size_t off = (b->arena_top + a - 1) / a * a;
    b->static_bytes += bytes;
    if (b->static_bytes > kStaticSharedLimit)
      fail("static shared memory of this kernel exceeds %zu bytes", kStaticSharedLimit);
    if (b->static_bytes + b->dyn_bytes > kDynamicSharedLimit)
      fail("%zu bytes of static plus %zu bytes of dynamic shared memory exceed the %zu-byte limit", b->static_bytes,
           b->dyn_bytes, kDynamicSharedLimit);
    if (off + bytes + kRedZone > b->arena.size()) fail("too many EMU_SHARED arrays in one kernel");
#ifdef EMU_ASAN
    ASAN_UNPOISON_MEMORY_REGION(b->arena.data() + off, bytes);
#endif
    b->arena_top = off + bytes + kRedZone;
    slot.ptr = b->arena.data() + off;
    slot.serial = b->serial;
  }
  return slot.ptr;
}

void* dyn_smem() { return tl_block->dyn; }

int run_grid(Dim3 grid, Dim3 block, unsigned smem, const LaunchOptions* opt, void (*body)(void*), void* ctx, char* err,
             size_t errlen) {
  const unsigned long long threads = static_cast<unsigned long long>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64) {
    write_error(err, errlen, format("invalid block (%u,%u,%u): 1 to 1024 threads, z at most 64", block.x, block.y, block.z));
    return 1;
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
    write_error(err, errlen, format("invalid grid (%u,%u,%u)", grid.x, grid.y, grid.z));
    return 1;
  }
  if (smem > kDynamicSharedLimit) {
    write_error(err, errlen, format("dynamic shared memory %u bytes exceeds the %zu-byte limit", smem, kDynamicSharedLimit));
    return 1;
  }
  LaunchState L;
  L.grid = grid;
  L.block = block;
  L.smem = smem;
  L.opt = opt;
  L.body = body;
  L.ctx = ctx;
  L.total = static_cast<unsigned long long>(grid.x) * grid.y * grid.z;
  const unsigned workers = unsigned(std::min<unsigned long long>(std::max(1u, opt->os_threads), L.total));
  std::vector<std::thread> pool;
  for (unsigned t = 1; t < workers; ++t) pool.emplace_back([&L] { run_blocks(L); });
  run_blocks(L);
  for (auto& t : pool) t.join();
  if (L.failed) {
    write_error(err, errlen, L.error);
    return 2;
  }
  return 0;
}

}  // namespace emu

// 1 when the virtual GPU was built with AddressSanitizer (VPR_VGPU_ASAN=1), for the tests.
extern "C" int emu_asan_enabled() {
#ifdef EMU_ASAN
  return 1;
#else
  return 0;
#endif
}

// Encodes a virtual GPU tensor map in `map` (128 bytes), with the arguments and the limits of
// `cuTensorMapEncodeTiled` for a tiled map with the 128-byte swizzle, so that what encodes here
// encodes on the GPU: `rank` dimensions innermost first, `strides` the rank - 1 byte strides of
// dimensions 1 and up. Returns 0, or 1 with the reason in `err`.
extern "C" int emu_encode_tensor_map(void* map, unsigned rank, unsigned long long address, const unsigned long long* dims,
                                     const unsigned long long* strides, const unsigned* box, unsigned elem_bytes,
                                     char* err, size_t errlen) {
  using emu::format;
  std::string why;
  if (rank < 1 || rank > 3)
    why = format("rank %u (the virtual GPU emulates 1 to 3)", rank);
  else if (address % 16)
    why = format("global address 0x%llx is not 16-byte aligned", address);
  else if (box[0] * elem_bytes > 128 || box[0] * elem_bytes % 16)
    why = format("the inner box dimension is %u bytes (a multiple of 16, at most the 128-byte swizzle span)",
                 box[0] * elem_bytes);
  for (unsigned d = 0; d < rank && why.empty(); ++d) {
    if (dims[d] < 1 || dims[d] > (1ull << 32))
      why = format("dimension %u has size %llu (1 to 2^32)", d, dims[d]);
    else if (box[d] < 1 || box[d] > 256)
      why = format("box dimension %u is %u (1 to 256)", d, box[d]);
    else if (d > 0 && (strides[d - 1] % 16 || strides[d - 1] >= (1ull << 40)))
      why = format("the stride of dimension %u is %llu bytes (a multiple of 16, below 2^40)", d, strides[d - 1]);
  }
  if (!why.empty()) {
    emu::write_error(err, errlen, "tensor map: " + why);
    return 1;
  }
  emu::TensorMapEmu m{};
  m.magic = emu::kTensorMapMagic;
  m.address = address;
  m.rank = rank;
  m.strides[0] = elem_bytes;
  for (unsigned d = 0; d < 3; ++d) {
    m.dims[d] = d < rank ? dims[d] : 1;
    m.box[d] = d < rank ? box[d] : 1;
    if (d > 0) m.strides[d] = d < rank ? strides[d - 1] : 0;
  }
  std::memcpy(map, &m, sizeof m);
  return 0;
}
