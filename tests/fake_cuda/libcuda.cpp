// A fake CUDA driver, built as libcuda.so.1 by tests/fake_cuda.rs, so that the engine's CUDA
// backend (cudarc and src/device/cuda.rs) runs end to end on a machine without a GPU.
//
// It implements the driver API calls the engine makes, with the checks the real driver makes on
// them: an initialised driver, a current context, live device ranges for copies, CUBIN images for
// the device's architecture, launch limits (threads, registers, shared memory opt-in) taken from
// the CUBIN's own attributes, and tensor-map arguments. A loaded CUBIN's kernels run on the virtual
// GPU (the same kernel files built for the host, from the library that build.rs makes), so results
// are real. As on a GPU, launches report kernel faults at the next synchronising call.
//
// Set up by the environment:
//   FAKE_CUDA_CC          compute capability, "9.0" (default) or e.g. "8.0"
//   FAKE_CUDA_DEVICES     number of devices (default 1)
//   FAKE_CUDA_INIT_ERROR  a CUresult that cuInit returns (a driver that cannot start)
//   FAKE_CUDA_LOG         a file to which every allocation, module load, attribute and launch is
//                         appended, a line each
// Calls outside this set are absent, so using one shows up as a missing symbol.

#include "common.cuh"

#include <fcntl.h>
#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

extern "C" const emu::ModuleInfo vgpu_modules[];
extern "C" const size_t vgpu_module_count;
extern "C" int emu_encode_tensor_map(void* map, unsigned rank, unsigned long long address,
                                     const unsigned long long* dims, const unsigned long long* strides,
                                     const unsigned* box, unsigned elem_bytes, char* err, size_t errlen);

namespace {

// CUresult values and enum constants of cuda.h that this driver uses.
enum : int {
  SUCCESS = 0,
  INVALID_VALUE = 1,
  OUT_OF_MEMORY = 2,
  NOT_INITIALIZED = 3,
  NO_DEVICE = 100,
  INVALID_DEVICE = 101,
  INVALID_IMAGE = 200,
  INVALID_CONTEXT = 201,
  NO_BINARY_FOR_GPU = 209,
  INVALID_HANDLE = 400,
  NOT_FOUND = 500,
  LAUNCH_OUT_OF_RESOURCES = 701,
  LAUNCH_FAILED = 719,
  NOT_SUPPORTED = 801,
};
enum : int {
  ATTR_MAX_THREADS_PER_BLOCK = 1,
  ATTR_MAX_SHARED_MEMORY_PER_BLOCK = 8,
  ATTR_WARP_SIZE = 10,
  ATTR_MAX_REGISTERS_PER_BLOCK = 12,
  ATTR_MULTIPROCESSOR_COUNT = 16,
  ATTR_COMPUTE_CAPABILITY_MAJOR = 75,
  ATTR_COMPUTE_CAPABILITY_MINOR = 76,
  ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
  ATTR_MEMORY_POOLS_SUPPORTED = 115,
  FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
  TMAP_FLOAT16 = 6,
  TMAP_BFLOAT16 = 9,
  TMAP_SWIZZLE_128B = 3,
};

const char* error_name(int e) {
  switch (e) {
    case SUCCESS: return "CUDA_SUCCESS";
    case INVALID_VALUE: return "CUDA_ERROR_INVALID_VALUE";
    case OUT_OF_MEMORY: return "CUDA_ERROR_OUT_OF_MEMORY";
    case NOT_INITIALIZED: return "CUDA_ERROR_NOT_INITIALIZED";
    case NO_DEVICE: return "CUDA_ERROR_NO_DEVICE";
    case INVALID_DEVICE: return "CUDA_ERROR_INVALID_DEVICE";
    case INVALID_IMAGE: return "CUDA_ERROR_INVALID_IMAGE";
    case INVALID_CONTEXT: return "CUDA_ERROR_INVALID_CONTEXT";
    case NO_BINARY_FOR_GPU: return "CUDA_ERROR_NO_BINARY_FOR_GPU";
    case INVALID_HANDLE: return "CUDA_ERROR_INVALID_HANDLE";
    case NOT_FOUND: return "CUDA_ERROR_NOT_FOUND";
    case LAUNCH_OUT_OF_RESOURCES: return "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES";
    case LAUNCH_FAILED: return "CUDA_ERROR_LAUNCH_FAILED";
    case NOT_SUPPORTED: return "CUDA_ERROR_NOT_SUPPORTED";
    default: return nullptr;
  }
}

struct Context {
  int device;
  int retains = 0;
};

struct Function;

struct Module {
  const emu::ModuleInfo* info = nullptr;
  std::map<std::string, std::unique_ptr<Function>> functions;
};

struct Function {
  Module* module;
  std::string name;
  unsigned registers = 0;
  unsigned max_threads = 1024;  // from __launch_bounds__, when the kernel has them
  unsigned static_shared = 0;
  unsigned max_dynamic_shared = 48 * 1024;
};

struct Driver {
  std::mutex mu;
  bool initialised = false;
  int major = 9, minor = 0, devices = 1, init_error = SUCCESS;
  int log_fd = -1;
  std::vector<std::unique_ptr<Context>> contexts;  // the primary context of each device
  std::map<unsigned long long, size_t> allocations;
  std::map<void*, size_t> host_allocations;  // page-locked host memory (cuMemHostAlloc)
  std::set<Module*> modules;
  std::set<Function*> functions;
  int sticky = SUCCESS;  // a kernel fault, reported by every later call, as a GPU does

  Driver() {
    if (const char* cc = std::getenv("FAKE_CUDA_CC")) std::sscanf(cc, "%d.%d", &major, &minor);
    if (const char* n = std::getenv("FAKE_CUDA_DEVICES")) devices = std::atoi(n);
    if (const char* e = std::getenv("FAKE_CUDA_INIT_ERROR")) init_error = std::atoi(e);
    if (const char* path = std::getenv("FAKE_CUDA_LOG")) log_fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    for (int d = 0; d < devices; ++d) contexts.push_back(std::unique_ptr<Context>(new Context{d}));
  }
  // Shared memory a block may opt in to: 227 KiB on 9.0, 163 KiB on 8.0, 99 KiB on other 8.x.
  int shared_optin() const { return major >= 9 ? 232448 : (minor == 0 ? 166912 : 101376); }
};

Driver& driver() {
  static Driver d;
  return d;
}

thread_local Context* tl_current = nullptr;

void log_line(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void log_line(const char* fmt, ...) {
  const int fd = driver().log_fd;
  if (fd < 0) return;
  char line[512];
  va_list ap;
  va_start(ap, fmt);
  int n = std::vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  n = n < 0 ? 0 : std::min(n, int(sizeof line) - 2);
  line[n++] = '\n';
  if (write(fd, line, size_t(n)) != n) std::perror("fake libcuda: FAKE_CUDA_LOG");
}

// Why a call fails, on stderr: the real driver only returns the code.
int fail(int code, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
int fail(int code, const char* fmt, ...) {
  std::fprintf(stderr, "fake libcuda: %s: ", error_name(code));
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fputc('\n', stderr);
  return code;
}

// The common preconditions of calls that work in the current context.
int context_call(Driver& d) {
  if (!d.initialised) return NOT_INITIALIZED;
  if (!tl_current || tl_current->retains == 0) return INVALID_CONTEXT;
  return d.sticky;
}

// Whether [ptr, ptr + bytes) lies inside one live allocation.
bool in_allocation(const Driver& d, unsigned long long ptr, size_t bytes) {
  auto it = d.allocations.upper_bound(ptr);
  if (it == d.allocations.begin()) return false;
  --it;
  return ptr + bytes <= it->first + it->second;
}

// ---- CUBIN reading: a 64-bit little-endian ELF with the kernels' attributes in .nv.info sections.

template <class T>
bool read_at(const unsigned char* image, size_t size, size_t offset, T& out) {
  if (offset > size || size - offset < sizeof(T)) return false;
  std::memcpy(&out, image + offset, sizeof(T));
  return true;
}

struct Section {
  unsigned name_offset;
  std::string name;
  unsigned type;
  unsigned long long offset, size;
  unsigned link, info;
};

struct Kernel {
  std::string name;
  unsigned registers = 0, max_threads = 1024, static_shared = 0;
};

// Parses the CUBIN (its size is not passed to cuModuleLoadData: the section table bounds it).
// Returns the architecture as major * 10 + minor, or -1 and the reason.
int parse_cubin(const unsigned char* image, std::vector<Kernel>& kernels, std::string& why) {
  const size_t kHeader = 64;
  if (std::memcmp(image, "\x7f" "ELF", 4) != 0 || image[4] != 2 || image[5] != 1) {
    why = "not a 64-bit little-endian ELF image (the engine loads CUBIN, never PTX)";
    return -1;
  }
  unsigned short machine, shentsize, shnum, shstrndx;
  unsigned flags;
  unsigned long long shoff;
  read_at(image, kHeader, 18, machine);
  read_at(image, kHeader, 40, shoff);
  read_at(image, kHeader, 48, flags);
  read_at(image, kHeader, 58, shentsize);
  read_at(image, kHeader, 60, shnum);
  read_at(image, kHeader, 62, shstrndx);
  if (machine != 190 || shentsize != 64 || shstrndx >= shnum) {
    why = "not a CUDA ELF image (machine " + std::to_string(machine) + ")";
    return -1;
  }
  // The CUDA 12.8+ ELF ABI (version 8) keeps the SM in bits 8-15 of e_flags, older ones in 0-7.
  const int arch = image[8] >= 8 ? int((flags >> 8) & 0xff) : int(flags & 0xff);
  const size_t size = shoff + size_t(shnum) * 64;
  std::vector<Section> sections(shnum);
  for (unsigned i = 0; i < shnum; ++i) {
    const size_t at = shoff + size_t(i) * 64;
    read_at(image, size, at, sections[i].name_offset);
    read_at(image, size, at + 4, sections[i].type);
    read_at(image, size, at + 24, sections[i].offset);
    read_at(image, size, at + 32, sections[i].size);
    read_at(image, size, at + 40, sections[i].link);
    read_at(image, size, at + 44, sections[i].info);
  }
  auto string_at = [&](const Section& table, unsigned long long at) {
    std::string s;
    for (unsigned long long p = table.offset + at; p < table.offset + table.size && image[p]; ++p) s += char(image[p]);
    return s;
  };
  for (auto& s : sections) s.name = string_at(sections[shstrndx], s.name_offset);

  std::map<unsigned, size_t> by_symbol;  // symbol index -> kernel
  for (const Section& s : sections) {
    if (s.type != 2 || s.link >= shnum) continue;  // SHT_SYMTAB
    for (unsigned long long at = s.offset, i = 0; at + 24 <= s.offset + s.size; at += 24, ++i) {
      unsigned name;
      unsigned char info = image[at + 4], other = image[at + 5];
      std::memcpy(&name, image + at, 4);
      // kernels are global functions marked as entry points (STO_CUDA_ENTRY)
      if ((info & 0xf) == 2 && (info >> 4) == 1 && (other & 0x10)) {
        by_symbol[unsigned(i)] = kernels.size();
        kernels.push_back(Kernel{string_at(sections[s.link], name)});
      }
    }
  }
  // An attribute is 4 bytes (format, attribute, 16 bits) followed, for format 4, by that many.
  auto attributes = [&](const Section& s, auto&& visit) {
    for (unsigned long long at = s.offset; at + 4 <= s.offset + s.size;) {
      const unsigned char format = image[at], attribute = image[at + 1];
      unsigned short value;
      std::memcpy(&value, image + at + 2, 2);
      const unsigned long long payload = format == 4 ? value : 0;
      visit(attribute, image + at + 4, payload);
      at += 4 + payload;
    }
  };
  for (const Section& s : sections) {
    if (s.name == ".nv.info") {
      attributes(s, [&](unsigned char attribute, const unsigned char* p, unsigned long long bytes) {
        unsigned symbol, value;
        if (attribute != 0x2f || bytes != 8) return;  // EIATTR_REGCOUNT
        std::memcpy(&symbol, p, 4);
        std::memcpy(&value, p + 4, 4);
        if (by_symbol.count(symbol)) kernels[by_symbol[symbol]].registers = value;
      });
    }
    for (Kernel& k : kernels) {
      if (s.name == ".nv.info." + k.name)
        attributes(s, [&](unsigned char attribute, const unsigned char* p, unsigned long long bytes) {
          unsigned xyz[3];
          if (attribute != 0x05 || bytes != 12) return;  // EIATTR_MAX_THREADS
          std::memcpy(xyz, p, 12);
          k.max_threads = xyz[0] * xyz[1] * xyz[2];
        });
      if (s.name == ".nv.shared." + k.name) k.static_shared = unsigned(s.size);
    }
  }
  if (kernels.empty()) {
    why = "the image has no kernels";
    return -1;
  }
  return arch;
}

// The virtual GPU kernel file whose kernels are exactly those of the image.
const emu::ModuleInfo* find_module(const std::vector<Kernel>& kernels) {
  std::set<std::string> names;
  for (const Kernel& k : kernels) names.insert(k.name);
  for (size_t m = 0; m < vgpu_module_count; ++m) {
    const emu::ModuleInfo& info = vgpu_modules[m];
    std::set<std::string> theirs(info.kernels, info.kernels + info.kernel_count);
    if (theirs == names) return &info;
  }
  return nullptr;
}

unsigned long long env_number(const char* name, unsigned long long fallback) {
  const char* v = std::getenv(name);
  return v ? std::strtoull(v, nullptr, 10) : fallback;
}

}  // namespace

#define API extern "C" __attribute__((visibility("default"))) int

using CUdevice = int;
using CUdeviceptr = unsigned long long;
using CUcontext = Context*;
using CUmodule = Module*;
using CUfunction = Function*;
using CUstream = void*;

API cuInit(unsigned flags) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (flags != 0) return fail(INVALID_VALUE, "cuInit flags must be 0");
  if (d.init_error != SUCCESS) return d.init_error;
  d.initialised = true;
  return SUCCESS;
}

// The driver's private tables of further entry points. NVRTC asks for them when it finds a
// libcuda; there are none here, and NVRTC compiles without them as on a machine without a driver.
API cuGetExportTable(const void** table, const void* id) {
  if (!table || !id) return INVALID_VALUE;
  *table = nullptr;
  return NOT_SUPPORTED;
}

API cuDriverGetVersion(int* version) {
  if (!version) return INVALID_VALUE;
  *version = 13000;
  return SUCCESS;
}

API cuGetErrorName(int error, const char** name) {
  if (!name) return INVALID_VALUE;
  *name = error_name(error);
  return *name ? SUCCESS : INVALID_VALUE;
}

API cuGetErrorString(int error, const char** text) { return cuGetErrorName(error, text); }

API cuDeviceGetCount(int* count) {
  Driver& d = driver();
  if (!d.initialised) return NOT_INITIALIZED;
  if (!count) return INVALID_VALUE;
  *count = d.devices;
  return SUCCESS;
}

API cuDeviceGet(CUdevice* device, int ordinal) {
  Driver& d = driver();
  if (!d.initialised) return NOT_INITIALIZED;
  if (!device) return INVALID_VALUE;
  if (ordinal < 0 || ordinal >= d.devices) return INVALID_DEVICE;
  *device = ordinal;
  return SUCCESS;
}

API cuDeviceGetName(char* name, int len, CUdevice device) {
  Driver& d = driver();
  if (!d.initialised) return NOT_INITIALIZED;
  if (device < 0 || device >= d.devices) return INVALID_DEVICE;
  if (!name || len <= 0) return INVALID_VALUE;
  std::snprintf(name, size_t(len), "vpr-engine fake CUDA driver (virtual GPU, sm_%d%d)", d.major, d.minor);
  return SUCCESS;
}

API cuDeviceTotalMem_v2(size_t* bytes, CUdevice device) {
  Driver& d = driver();
  if (!d.initialised) return NOT_INITIALIZED;
  if (device < 0 || device >= d.devices) return INVALID_DEVICE;
  if (!bytes) return INVALID_VALUE;
  *bytes = size_t(80) << 30;
  return SUCCESS;
}

API cuDeviceGetAttribute(int* value, int attribute, CUdevice device) {
  Driver& d = driver();
  if (!d.initialised) return NOT_INITIALIZED;
  if (device < 0 || device >= d.devices) return INVALID_DEVICE;
  if (!value) return INVALID_VALUE;
  switch (attribute) {
    case ATTR_MAX_THREADS_PER_BLOCK: *value = 1024; break;
    case ATTR_MAX_SHARED_MEMORY_PER_BLOCK: *value = 48 * 1024; break;
    case ATTR_WARP_SIZE: *value = 32; break;
    case ATTR_MAX_REGISTERS_PER_BLOCK: *value = 65536; break;
    case ATTR_MULTIPROCESSOR_COUNT: *value = 3; break;  // few, so persistent kernels walk many tiles
    case ATTR_COMPUTE_CAPABILITY_MAJOR: *value = d.major; break;
    case ATTR_COMPUTE_CAPABILITY_MINOR: *value = d.minor; break;
    case ATTR_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = d.shared_optin(); break;
    case ATTR_MEMORY_POOLS_SUPPORTED: *value = 1; break;
    default: return fail(NOT_SUPPORTED, "device attribute %d is not emulated", attribute);
  }
  return SUCCESS;
}

API cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice device) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (!d.initialised) return NOT_INITIALIZED;
  if (device < 0 || device >= d.devices) return INVALID_DEVICE;
  if (!ctx) return INVALID_VALUE;
  Context* c = d.contexts[size_t(device)].get();
  ++c->retains;
  *ctx = c;
  return SUCCESS;
}

API cuDevicePrimaryCtxRelease_v2(CUdevice device) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (!d.initialised) return NOT_INITIALIZED;
  if (device < 0 || device >= d.devices) return INVALID_DEVICE;
  Context* c = d.contexts[size_t(device)].get();
  if (c->retains == 0) return fail(INVALID_CONTEXT, "releasing a primary context that is not retained");
  --c->retains;
  return SUCCESS;
}

API cuCtxGetCurrent(CUcontext* ctx) {
  if (!driver().initialised) return NOT_INITIALIZED;
  if (!ctx) return INVALID_VALUE;
  *ctx = tl_current;
  return SUCCESS;
}

API cuCtxSetCurrent(CUcontext ctx) {
  Driver& d = driver();
  if (!d.initialised) return NOT_INITIALIZED;
  bool known = !ctx;
  for (auto& c : d.contexts) known = known || c.get() == ctx;
  if (!known) return fail(INVALID_CONTEXT, "cuCtxSetCurrent with a context this driver never made");
  tl_current = ctx;
  return SUCCESS;
}

API cuCtxSynchronize() {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  return context_call(d);
}

API cuMemAlloc_v2(CUdeviceptr* ptr, size_t bytes) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!ptr || bytes == 0) return fail(INVALID_VALUE, "cuMemAlloc of %zu bytes", bytes);
  void* p = std::aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (!p) return OUT_OF_MEMORY;
  std::memset(p, 0xff, bytes);  // what a kernel fails to write reads as NaN
  *ptr = reinterpret_cast<CUdeviceptr>(p);
  d.allocations[*ptr] = bytes;
  log_line("cuMemAlloc %zu", bytes);
  return SUCCESS;
}

API cuMemFree_v2(CUdeviceptr ptr) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  auto it = d.allocations.find(ptr);
  if (it == d.allocations.end()) return fail(INVALID_VALUE, "cuMemFree(0x%llx): not an allocation", ptr);
  log_line("cuMemFree %zu", it->second);
  d.allocations.erase(it);
  std::free(reinterpret_cast<void*>(ptr));
  return SUCCESS;
}

API cuMemHostAlloc(void** ptr, size_t bytes, unsigned int flags) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!ptr || bytes == 0 || flags > 0x7) return fail(INVALID_VALUE, "cuMemHostAlloc of %zu bytes, flags %u", bytes, flags);
  void* p = std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096);  // page-locked memory is page-aligned
  if (!p) return OUT_OF_MEMORY;
  std::memset(p, 0xff, bytes);
  *ptr = p;
  d.host_allocations[p] = bytes;
  log_line("cuMemHostAlloc %zu", bytes);
  return SUCCESS;
}

API cuMemFreeHost(void* ptr) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  auto it = d.host_allocations.find(ptr);
  if (it == d.host_allocations.end()) return fail(INVALID_VALUE, "cuMemFreeHost(%p): not a host allocation", ptr);
  log_line("cuMemFreeHost %zu", it->second);
  d.host_allocations.erase(it);
  std::free(ptr);
  return SUCCESS;
}

API cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t bytes) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!in_allocation(d, dst, bytes)) return fail(INVALID_VALUE, "cuMemcpyHtoD of %zu bytes to 0x%llx", bytes, dst);
  std::memcpy(reinterpret_cast<void*>(dst), src, bytes);
  return SUCCESS;
}

API cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t bytes) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!in_allocation(d, src, bytes)) return fail(INVALID_VALUE, "cuMemcpyDtoH of %zu bytes from 0x%llx", bytes, src);
  std::memcpy(dst, reinterpret_cast<const void*>(src), bytes);
  return SUCCESS;
}

API cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t bytes) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!in_allocation(d, src, bytes) || !in_allocation(d, dst, bytes))
    return fail(INVALID_VALUE, "cuMemcpyDtoD of %zu bytes from 0x%llx to 0x%llx", bytes, src, dst);
  std::memmove(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes);
  return SUCCESS;
}

API cuMemsetD8_v2(CUdeviceptr dst, unsigned char value, size_t bytes) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!in_allocation(d, dst, bytes)) return fail(INVALID_VALUE, "cuMemsetD8 of %zu bytes at 0x%llx", bytes, dst);
  std::memset(reinterpret_cast<void*>(dst), value, bytes);
  return SUCCESS;
}

API cuModuleLoadData(CUmodule* module, const void* image) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!module || !image) return INVALID_VALUE;
  std::vector<Kernel> kernels;
  std::string why;
  const int arch = parse_cubin(static_cast<const unsigned char*>(image), kernels, why);
  if (arch < 0) return fail(INVALID_IMAGE, "cuModuleLoadData: %s", why.c_str());
  // a CUBIN runs on its own major architecture at the same or a higher minor version
  if (arch / 10 != d.major || arch % 10 > d.minor)
    return fail(NO_BINARY_FOR_GPU, "cuModuleLoadData: a CUBIN for sm_%d on a %d.%d device", arch, d.major, d.minor);
  const emu::ModuleInfo* info = find_module(kernels);
  if (!info)
    return fail(INVALID_IMAGE, "cuModuleLoadData: no kernel file of the virtual GPU has exactly the %zu kernels "
                "of this image (first: %s)", kernels.size(), kernels[0].name.c_str());
  Module* m = new Module{info, {}};
  for (const Kernel& k : kernels) {
    Function* f = new Function{m, k.name, k.registers, k.max_threads, k.static_shared};
    m->functions[k.name].reset(f);
    d.functions.insert(f);
  }
  d.modules.insert(m);
  *module = m;
  log_line("cuModuleLoadData %s sm_%d", info->name, arch);
  return SUCCESS;
}

API cuModuleUnload(CUmodule module) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!d.modules.erase(module)) return fail(INVALID_HANDLE, "cuModuleUnload of an unknown module");
  for (auto& f : module->functions) d.functions.erase(f.second.get());
  log_line("cuModuleUnload %s", module->info->name);
  delete module;
  return SUCCESS;
}

API cuModuleGetFunction(CUfunction* function, CUmodule module, const char* name) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!function || !name) return INVALID_VALUE;
  if (!d.modules.count(module)) return fail(INVALID_HANDLE, "cuModuleGetFunction(%s) in an unknown module", name);
  auto it = module->functions.find(name);
  if (it == module->functions.end()) return NOT_FOUND;
  *function = it->second.get();
  return SUCCESS;
}

API cuFuncSetAttribute(CUfunction f, int attribute, int value) {
  Driver& d = driver();
  std::lock_guard<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!d.functions.count(f)) return fail(INVALID_HANDLE, "cuFuncSetAttribute on an unknown function");
  if (attribute != FUNC_ATTR_MAX_DYNAMIC_SHARED_SIZE_BYTES)
    return fail(NOT_SUPPORTED, "function attribute %d is not emulated", attribute);
  if (value < 0 || unsigned(value) + f->static_shared > unsigned(d.shared_optin()))
    return fail(INVALID_VALUE, "%s: %d bytes of dynamic shared memory beside %u static (the limit is %d)",
                f->name.c_str(), value, f->static_shared, d.shared_optin());
  f->max_dynamic_shared = unsigned(value);
  log_line("cuFuncSetAttribute %s max_dynamic_shared %d", f->name.c_str(), value);
  return SUCCESS;
}

API cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, CUstream stream, void** params, void** extra) {
  Driver& d = driver();
  std::unique_lock<std::mutex> lock(d.mu);
  if (int e = context_call(d)) return e;
  if (!d.functions.count(f)) return fail(INVALID_HANDLE, "cuLaunchKernel of an unknown function");
  if (stream) return fail(INVALID_HANDLE, "%s: this driver has no streams besides the null stream", f->name.c_str());
  if (extra || !params) return fail(INVALID_VALUE, "%s: arguments must come as kernelParams", f->name.c_str());
  const unsigned long long threads = 1ull * bx * by * bz;
  if (threads == 0 || threads > 1024 || bz > 64 || gx == 0 || gy == 0 || gz == 0 || gx > 0x7fffffffu ||
      gy > 65535 || gz > 65535)
    return fail(INVALID_VALUE, "%s: grid (%u,%u,%u) block (%u,%u,%u)", f->name.c_str(), gx, gy, gz, bx, by, bz);
  if (threads > f->max_threads)
    return fail(INVALID_VALUE, "%s: %llu threads, above its __launch_bounds__ of %u", f->name.c_str(), threads,
                f->max_threads);
  // registers are allocated per warp in units of 256
  const unsigned long long warps = (threads + 31) / 32, per_warp = (f->registers * 32ull + 255) / 256 * 256;
  if (warps * per_warp > 65536)
    return fail(LAUNCH_OUT_OF_RESOURCES, "%s: %llu threads at %u registers", f->name.c_str(), threads, f->registers);
  if (shared > f->max_dynamic_shared)
    return fail(INVALID_VALUE, "%s: %u bytes of dynamic shared memory, above the function's limit of %u (raise it "
                "with CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)", f->name.c_str(), shared,
                f->max_dynamic_shared);
  log_line("cuLaunchKernel %s grid %u,%u,%u block %u,%u,%u shared %u", f->name.c_str(), gx, gy, gz, bx, by, bz,
           shared);
  const emu::LaunchOptions options{env_number("VPR_VGPU_SEED", 0), 2, 64 * 1024, 0};
  char err[4096] = {0};
  const int rc = f->module->info->launch(f->name.c_str(), emu::Dim3{gx, gy, gz}, emu::Dim3{bx, by, bz}, shared,
                                         params, &options, err, sizeof err);
  if (rc != 0) {
    fail(LAUNCH_FAILED, "%s faulted on the virtual GPU: %s", f->name.c_str(), err);
    d.sticky = LAUNCH_FAILED;
  }
  return SUCCESS;
}

API cuTensorMapEncodeTiled(void* map, int data_type, unsigned rank, void* address, const unsigned long long* dims,
                           const unsigned long long* strides, const unsigned* box, const unsigned* element_strides,
                           int interleave, int swizzle, int l2_promotion, int oob_fill) {
  Driver& d = driver();
  if (!d.initialised) return NOT_INITIALIZED;
  if (d.major < 9) return fail(NOT_SUPPORTED, "tensor maps need compute capability 9.0");
  if (!map || reinterpret_cast<uintptr_t>(map) % 64 || !dims || !box || !element_strides || (rank > 1 && !strides))
    return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: missing or misaligned (64 bytes) argument");
  if (data_type != TMAP_FLOAT16 && data_type != TMAP_BFLOAT16)
    return fail(NOT_SUPPORTED, "cuTensorMapEncodeTiled: data type %d is not emulated (16-bit floats only)", data_type);
  for (unsigned i = 0; i < rank; ++i)
    if (element_strides[i] != 1)
      return fail(NOT_SUPPORTED, "cuTensorMapEncodeTiled: element strides other than 1 are not emulated");
  if (interleave != 0 || swizzle != TMAP_SWIZZLE_128B || oob_fill != 0 || l2_promotion < 0 || l2_promotion > 4)
    return fail(NOT_SUPPORTED, "cuTensorMapEncodeTiled: only non-interleaved, 128-byte-swizzled, zero-filled maps "
                "are emulated");
  char err[512] = {0};
  if (emu_encode_tensor_map(map, rank, reinterpret_cast<unsigned long long>(address), dims, strides, box, 2, err,
                            sizeof err))
    return fail(INVALID_VALUE, "cuTensorMapEncodeTiled: %s", err);
  log_line("cuTensorMapEncodeTiled rank %u box %u,%u,%u", rank, box[0], rank > 1 ? box[1] : 1, rank > 2 ? box[2] : 1);
  return SUCCESS;
}
