// The launcher and fiber scheduler of the host emulation of CUDA (see README.md). Include simt.h, not this file.
//
// A launch runs its blocks one after another on the calling host thread. The threads of a block are fibers
// (ucontext), started in thread order; each runs until it reaches a barrier or returns, then the next one runs.
// When no fiber can run, the scheduler completes the barriers that every thread they wait for has reached, and
// reports a deadlock when there is none. Everything here is per host thread, so host threads launch concurrently.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The parts of the CUDA runtime API that kernels and launchers use.
typedef struct CUstream_st* cudaStream_t;

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
typedef cudaError_t cudaError;

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace varcore::simt {

inline constexpr unsigned kWarpSize = 32;
inline constexpr unsigned long long kMaxThreadsPerBlock = 1024;
inline constexpr unsigned kMaxBlockDimZ = 64;
inline constexpr unsigned kMaxGridDimX = 2147483647u;
inline constexpr unsigned kMaxGridDimYZ = 65535;
inline constexpr std::size_t kDefaultDynamicSmem = 48 * 1024;  // without cudaFuncSetAttribute
inline constexpr std::size_t kMaxDynamicSmem = 227 * 1024;     // per block, with it

namespace detail {

// The built-in variables of the emulated thread that is running; the scheduler sets thread_idx at every switch.
struct Builtins {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
inline thread_local Builtins builtins{};

inline thread_local cudaError_t last_error = cudaSuccess;

// Per kernel function, like CUDA's function attributes: shared by all host threads.
struct FuncAttributes {
  std::mutex mutex;
  std::unordered_map<const void*, std::size_t> max_dynamic_smem;
};
inline FuncAttributes& func_attributes() {
  static FuncAttributes attributes;
  return attributes;
}

inline std::size_t max_dynamic_smem(const void* kernel) {
  FuncAttributes& attributes = func_attributes();
  std::lock_guard<std::mutex> lock(attributes.mutex);
  auto it = attributes.max_dynamic_smem.find(kernel);
  return it == attributes.max_dynamic_smem.end() ? kDefaultDynamicSmem : it->second;
}

inline std::string dim_string(uint3 d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

inline void validate_launch(const void* kernel, dim3 grid, dim3 block, std::size_t smem) {
  auto fail = [](const std::string& what) { throw std::runtime_error("simt launch: " + what); };
  const std::pair<const char*, unsigned> dims[] = {{"gridDim.x", grid.x},   {"gridDim.y", grid.y},
                                                   {"gridDim.z", grid.z},   {"blockDim.x", block.x},
                                                   {"blockDim.y", block.y}, {"blockDim.z", block.z}};
  for (const auto& [name, value] : dims) {
    if (value == 0) fail(std::string(name) + " is 0; every grid and block dimension must be at least 1");
  }
  if (block.z > kMaxBlockDimZ) {
    fail("blockDim.z = " + std::to_string(block.z) + " exceeds the limit of " + std::to_string(kMaxBlockDimZ));
  }
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads > kMaxThreadsPerBlock) {
    fail("blockDim " + dim_string(block) + " has " + std::to_string(threads) +
         " threads; a block has at most " + std::to_string(kMaxThreadsPerBlock));
  }
  if (grid.x > kMaxGridDimX) {
    fail("gridDim.x = " + std::to_string(grid.x) + " exceeds the limit of " + std::to_string(kMaxGridDimX));
  }
  if (grid.y > kMaxGridDimYZ) {
    fail("gridDim.y = " + std::to_string(grid.y) + " exceeds the limit of " + std::to_string(kMaxGridDimYZ));
  }
  if (grid.z > kMaxGridDimYZ) {
    fail("gridDim.z = " + std::to_string(grid.z) + " exceeds the limit of " + std::to_string(kMaxGridDimYZ));
  }
  if (smem > kMaxDynamicSmem) {
    fail("dynamic shared memory of " + std::to_string(smem) + " bytes exceeds the per-block maximum of " +
         std::to_string(kMaxDynamicSmem) + " bytes (227 KiB)");
  }
  const std::size_t limit = max_dynamic_smem(kernel);
  if (smem > limit) {
    fail("dynamic shared memory of " + std::to_string(smem) + " bytes exceeds this kernel's limit of " +
         std::to_string(limit) + " bytes; raise it first with cudaFuncSetAttribute(kernel, "
         "cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)");
  }
}

inline std::size_t fiber_stack_bytes() {
  static const std::size_t bytes = [] {
    const char* env = std::getenv("VARCORE_SIMT_STACK_KB");
    if (env == nullptr || *env == '\0') return std::size_t{64} * 1024;
    char* end = nullptr;
    const long kb = std::strtol(env, &end, 10);
    if (*end != '\0' || kb < 16 || kb > 65536) {
      throw std::runtime_error(
          std::string("VARCORE_SIMT_STACK_KB must be a whole number of KiB in [16, 65536], got '") + env + "'");
    }
    return static_cast<std::size_t>(kb) * 1024;
  }();
  return bytes;
}

enum class Wait : unsigned char { kNone, kBlock, kWarp, kDone };
enum class WarpOp : unsigned char { kSync, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kSync: return "__syncwarp";
    case WarpOp::kShflIdx: return "__shfl_sync";
    case WarpOp::kShflUp: return "__shfl_up_sync";
    case WarpOp::kShflDown: return "__shfl_down_sync";
    case WarpOp::kShflXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
  }
  return "warp operation";
}

inline bool is_shuffle(WarpOp op) {
  return op == WarpOp::kShflIdx || op == WarpOp::kShflUp || op == WarpOp::kShflDown || op == WarpOp::kShflXor;
}

// What a lane reads from a lane that does not take part in the shuffle (undefined in CUDA): NaN for floats.
inline constexpr std::uint64_t kShufflePoison = ~std::uint64_t{0};

// One emulated thread: its context, its stack (with a guard page below it) and what it waits for.
struct Fiber {
  ucontext_t ctx;
  void* mapping = nullptr;
  std::size_t mapping_size = 0;
  char* stack = nullptr;
  std::size_t stack_size = 0;
  uint3 tid{};
  Wait wait = Wait::kNone;
  // The pending warp operation or __syncthreads_count: its arguments and its result.
  WarpOp op = WarpOp::kSync;
  unsigned mask = 0;
  int arg = 0;
  int width = 32;
  std::uint64_t in = 0;
  std::uint64_t out = 0;
  unsigned group = 0;  // lanes that took part in the warp operation

  explicit Fiber(std::size_t stack_bytes) {
    const std::size_t page = 4096;
    mapping_size = stack_bytes + page;
    mapping = mmap(nullptr, mapping_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapping == MAP_FAILED) {
      mapping = nullptr;
      throw std::runtime_error("simt: cannot map a fiber stack of " + std::to_string(stack_bytes) + " bytes");
    }
    // The stack grows down: an overflow hits the inaccessible lowest page instead of another fiber's stack.
    mprotect(mapping, page, PROT_NONE);
    stack = static_cast<char*>(mapping) + page;
    stack_size = stack_bytes;
    if (getcontext(&ctx) != 0) {
      munmap(mapping, mapping_size);
      throw std::runtime_error("simt: getcontext failed");
    }
  }
  ~Fiber() { munmap(mapping, mapping_size); }
  Fiber(const Fiber&) = delete;
  Fiber& operator=(const Fiber&) = delete;
};

// A type-erased call of the kernel with the launch's arguments.
struct KernelCall {
  void* object;
  void (*invoke)(void*);
};

class Runtime {
 public:
  static Runtime& current() {
    static thread_local Runtime runtime;
    return runtime;
  }

  void launch(const void* kernel, dim3 grid, dim3 block, std::size_t smem, KernelCall call) {
    if (active_) throw std::runtime_error("simt: a kernel launched a kernel; dynamic parallelism is not emulated");
    validate_launch(kernel, grid, block, smem);
    const unsigned n = block.x * block.y * block.z;
    while (fibers_.size() < n) fibers_.push_back(std::make_unique<Fiber>(fiber_stack_bytes()));
    // Dynamic shared memory, 128-byte aligned; refilled with 0xff for every block so reads of memory that the
    // block did not write give NaN or -1 instead of plausible values.
    smem_storage_.resize(smem + 128);
    smem_ = smem_storage_.data() + (128 - reinterpret_cast<std::uintptr_t>(smem_storage_.data()) % 128);
    smem_bytes_ = smem;

    builtins.grid_dim = grid;
    builtins.block_dim = block;
    call_ = call;
    active_ = true;
    struct Reset {
      Runtime& rt;
      ~Reset() {
        rt.active_ = false;
        rt.error_ = nullptr;
      }
    } reset{*this};
    for (unsigned z = 0; z < grid.z; ++z) {
      for (unsigned y = 0; y < grid.y; ++y) {
        for (unsigned x = 0; x < grid.x; ++x) {
          builtins.block_idx = uint3{x, y, z};
          run_block(block, n);
        }
      }
    }
  }

  // __syncthreads and its counting forms: returns how many of the threads that arrived passed a non-zero
  // predicate, and in *arrived how many arrived (threads that returned are not waited for).
  unsigned sync_threads(int predicate, unsigned* arrived) {
    Fiber& f = running("__syncthreads");
    f.wait = Wait::kBlock;
    f.in = predicate != 0;
    ++block_waiting_;
    suspend(f);
    if (arrived != nullptr) *arrived = f.group;
    return static_cast<unsigned>(f.out);
  }

  // A warp operation: waits until every lane named in mask (that exists and has not returned) has made the same
  // call with the same mask, then returns this lane's result; *group receives the lanes that took part.
  std::uint64_t warp_op(WarpOp op, unsigned mask, std::uint64_t in, int arg, int width, unsigned* group) {
    Fiber& f = running(warp_op_name(op));
    const unsigned lane = current_ % kWarpSize;
    if (((mask >> lane) & 1u) == 0) {
      throw std::runtime_error(std::string(warp_op_name(op)) + ": mask " + hex(mask) +
                               " does not include the calling lane " + std::to_string(lane) + " (thread " +
                               dim_string(f.tid) + ")");
    }
    if (is_shuffle(op) && (width < 1 || width > 32 || (width & (width - 1)) != 0)) {
      throw std::runtime_error(std::string(warp_op_name(op)) + ": width " + std::to_string(width) +
                               " is not a power of 2 in [1, 32]");
    }
    f.wait = Wait::kWarp;
    f.op = op;
    f.mask = mask;
    f.in = in;
    f.arg = arg;
    f.width = width;
    ++warp_waiting_;
    suspend(f);
    if (group != nullptr) *group = f.group;
    return f.out;
  }

  void* dynamic_shared() {
    running("dynamic shared memory");
    return smem_;
  }

  Runtime() = default;
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

 private:
  Fiber& running(const char* what) {
    if (!active_) throw std::runtime_error(std::string("simt: ") + what + " used outside a kernel launch");
    return *fibers_[current_];
  }

  static std::string hex(unsigned v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
  }

  // Entry point of every fiber; it never returns (a finished fiber is left for good).
  static void fiber_main() {
    Runtime& rt = current();
    Fiber& f = *rt.fibers_[rt.current_];
    try {
      rt.call_.invoke(rt.call_.object);
    } catch (...) {
      // Exceptions cannot cross a context switch: hand it to the scheduler, which ends the launch.
      if (!rt.error_) rt.error_ = std::current_exception();
    }
    f.wait = Wait::kDone;
    --rt.live_;
    rt.suspend(f);
    std::abort();  // a finished fiber is never resumed
  }

  void enter(unsigned i) {
    current_ = i;
    builtins.thread_idx = fibers_[i]->tid;
  }

  // Leaves fiber f for the next fiber of this sweep that can run (in thread order), or for the scheduler at the
  // end of the sweep or after an error. Switching fiber to fiber halves the number of switches.
  void suspend(Fiber& f) {
    if (!error_) {
      for (unsigned j = current_ + 1; j < block_threads_; ++j) {
        if (fibers_[j]->wait == Wait::kNone) {
          enter(j);
          swapcontext(&f.ctx, &fibers_[j]->ctx);
          return;
        }
      }
    }
    swapcontext(&f.ctx, &scheduler_);
  }

  void run_block(dim3 block, unsigned n) {
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = *fibers_[i];
      f.tid = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
      f.wait = Wait::kNone;
      // A fiber's saved context is reused: only its entry point and stack are set again.
      f.ctx.uc_stack.ss_sp = f.stack;
      f.ctx.uc_stack.ss_size = f.stack_size;
      f.ctx.uc_link = nullptr;
      makecontext(&f.ctx, &Runtime::fiber_main, 0);
    }
    if (smem_bytes_ > 0) std::memset(smem_, 0xff, smem_bytes_);
    live_ = n;
    block_waiting_ = 0;
    warp_waiting_ = 0;
    block_threads_ = n;
    for (;;) {
      // One sweep: the first fiber that can run, which hands over to the next one when it blocks, and so on.
      for (unsigned i = 0; i < n; ++i) {
        if (fibers_[i]->wait != Wait::kNone) continue;
        enter(i);
        if (swapcontext(&scheduler_, &fibers_[i]->ctx) != 0) throw std::runtime_error("simt: swapcontext failed");
        if (error_) std::rethrow_exception(error_);
        break;
      }
      if (live_ == 0) return;
      if (warp_waiting_ > 0 && release_warp_groups(n)) continue;
      if (block_waiting_ == live_) {
        release_block(n);
        continue;
      }
      throw std::runtime_error(deadlock_message(n));
    }
  }

  void release_block(unsigned n) {
    unsigned count = 0;
    for (unsigned i = 0; i < n; ++i) {
      if (fibers_[i]->wait == Wait::kBlock) count += static_cast<unsigned>(fibers_[i]->in);
    }
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = *fibers_[i];
      if (f.wait != Wait::kBlock) continue;
      f.out = count;
      f.group = block_waiting_;
      f.wait = Wait::kNone;
    }
    block_waiting_ = 0;
  }

  // Completes every warp operation whose lanes have all arrived; returns whether any did.
  bool release_warp_groups(unsigned n) {
    bool released = false;
    for (unsigned base = 0; base < n; base += kWarpSize) {
      const unsigned lanes = n - base < kWarpSize ? n - base : kWarpSize;
      const unsigned exists = lanes == kWarpSize ? ~0u : (1u << lanes) - 1;
      for (unsigned lane = 0; lane < lanes; ++lane) {
        const Fiber& f = *fibers_[base + lane];
        if (f.wait != Wait::kWarp) continue;
        unsigned group = 0;
        bool complete = true;
        for (unsigned j = 0; j < lanes && complete; ++j) {
          if (((f.mask & exists) >> j & 1u) == 0) continue;
          const Fiber& g = *fibers_[base + j];
          if (g.wait == Wait::kDone) continue;
          complete = g.wait == Wait::kWarp && g.mask == f.mask && g.op == f.op;
          group |= 1u << j;
        }
        if (!complete) continue;
        finish_warp_op(base, group, f.op);
        released = true;
      }
    }
    return released;
  }

  void finish_warp_op(unsigned base, unsigned group, WarpOp op) {
    std::uint64_t ballot = 0;
    for (unsigned j = 0; j < kWarpSize; ++j) {
      if ((group >> j & 1u) && fibers_[base + j]->in != 0) ballot |= 1ull << j;
    }
    for (unsigned j = 0; j < kWarpSize; ++j) {
      if ((group >> j & 1u) == 0) continue;
      Fiber& f = *fibers_[base + j];
      if (is_shuffle(op)) {
        f.out = shuffle_source(f, j, base, group);
      } else {
        f.out = ballot;
      }
      f.group = group;
      f.wait = Wait::kNone;
    }
    warp_waiting_ -= static_cast<unsigned>(__builtin_popcount(group));
  }

  // The value a lane receives from a shuffle. The source lane follows PTX shfl.sync: the lane operand is taken
  // modulo 32, and a source outside the lane's segment of `width` lanes gives the lane's own value (xor may still
  // read a lower segment). A source lane that does not take part gives kShufflePoison.
  std::uint64_t shuffle_source(const Fiber& f, unsigned lane, unsigned base, unsigned group) const {
    const int l = static_cast<int>(lane);
    const int b = f.arg & 31;
    const int first = l & ~(f.width - 1);
    const int last = first + f.width - 1;
    int src = l;
    switch (f.op) {
      case WarpOp::kShflIdx: src = first | (b & (f.width - 1)); break;
      case WarpOp::kShflUp: src = l - b >= first ? l - b : l; break;
      case WarpOp::kShflDown: src = l + b <= last ? l + b : l; break;
      case WarpOp::kShflXor: src = (l ^ b) <= last ? l ^ b : l; break;
      default: break;
    }
    if (src == l) return f.in;
    return (group >> src & 1u) ? fibers_[base + src]->in : kShufflePoison;
  }

  static std::string ranges(const std::vector<unsigned>& ids) {
    std::string out;
    std::size_t shown = 0;
    for (std::size_t i = 0; i < ids.size();) {
      std::size_t j = i;
      while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
      if (shown == 8) return out + ", ...";
      out += (shown++ ? ", " : "") + std::to_string(ids[i]) + (j > i ? "-" + std::to_string(ids[j]) : "");
      i = j + 1;
    }
    return out;
  }

  std::string deadlock_message(unsigned n) const {
    // Blocked threads, grouped by what they wait for (linear thread ids, x fastest).
    std::vector<std::pair<std::string, std::vector<unsigned>>> waits;
    unsigned exited = 0;
    for (unsigned i = 0; i < n; ++i) {
      const Fiber& f = *fibers_[i];
      std::string what;
      if (f.wait == Wait::kDone) {
        ++exited;
        continue;
      }
      what = f.wait == Wait::kBlock ? std::string("__syncthreads")
                                    : std::string(warp_op_name(f.op)) + " (mask " + hex(f.mask) + ")";
      auto it = waits.begin();
      while (it != waits.end() && it->first != what) ++it;
      if (it == waits.end()) it = waits.insert(waits.end(), {what, {}});
      it->second.push_back(i);
    }
    std::string msg = "deadlock: block " + dim_string(builtins.block_idx) + " of a launch with blockDim " +
                      dim_string(builtins.block_dim) + " cannot make progress:";
    for (const auto& [what, ids] : waits) msg += " threads " + ranges(ids) + " wait at " + what + ";";
    msg += " " + std::to_string(exited) + " threads have returned. Threads wait at a barrier that others never " +
           "reach (__syncthreads or a warp operation in divergent code, or warp operations that differ in " +
           "kind or mask).";
    return msg;
  }

  std::vector<std::unique_ptr<Fiber>> fibers_;  // grow only: contexts must not move
  ucontext_t scheduler_{};
  KernelCall call_{};
  std::exception_ptr error_;
  std::vector<unsigned char> smem_storage_;
  unsigned char* smem_ = nullptr;
  std::size_t smem_bytes_ = 0;
  bool active_ = false;
  unsigned current_ = 0;
  unsigned block_threads_ = 0;
  unsigned live_ = 0;
  unsigned block_waiting_ = 0;
  unsigned warp_waiting_ = 0;
};

}  // namespace detail

inline void* dynamic_shared() { return detail::Runtime::current().dynamic_shared(); }

// The emulated kernel<<<grid, block, smem, stream>>>(args...): launch(...)(args...) runs the whole grid before it
// returns (the stream is not used: every launch is synchronous).
template <class Kernel>
class Launch {
  static_assert(std::is_pointer_v<Kernel> && std::is_function_v<std::remove_pointer_t<Kernel>>,
                "VC_LAUNCH needs a __global__ function");

 public:
  Launch(Kernel kernel, dim3 grid, dim3 block, std::size_t smem)
      : kernel_(kernel), grid_(grid), block_(block), smem_(smem) {}

  template <class... Args>
  void operator()(Args&&... args) const {
    // The arguments are copied once, as CUDA copies them to the launch; each thread gets the kernel's parameters
    // from these copies.
    std::tuple<std::decay_t<Args>...> params(std::forward<Args>(args)...);
    auto call = [&] { std::apply(kernel_, params); };
    using Call = decltype(call);
    detail::Runtime::current().launch(reinterpret_cast<const void*>(kernel_), grid_, block_, smem_,
                                      detail::KernelCall{&call, [](void* c) { (*static_cast<Call*>(c))(); }});
  }

 private:
  Kernel kernel_;
  dim3 grid_;
  dim3 block_;
  std::size_t smem_;
};

template <class Kernel>
Launch<Kernel> launch(Kernel kernel, dim3 grid, dim3 block, std::size_t smem, cudaStream_t) {
  return Launch<Kernel>(kernel, grid, block, smem);
}

}  // namespace varcore::simt

inline cudaError_t cudaGetLastError() {
  const cudaError_t err = varcore::simt::detail::last_error;
  varcore::simt::detail::last_error = cudaSuccess;
  return err;
}

inline cudaError_t cudaPeekAtLastError() { return varcore::simt::detail::last_error; }

inline const char* cudaGetErrorString(cudaError_t err) {
  switch (err) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
  }
  return "unrecognized error code";
}

template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attr, int value) {
  static_assert(std::is_function_v<Kernel>, "cudaFuncSetAttribute needs a __global__ function");
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<std::size_t>(value) > varcore::simt::kMaxDynamicSmem) {
    varcore::simt::detail::last_error = cudaErrorInvalidValue;
    return cudaErrorInvalidValue;
  }
  auto& attributes = varcore::simt::detail::func_attributes();
  std::lock_guard<std::mutex> lock(attributes.mutex);
  attributes.max_dynamic_smem[reinterpret_cast<const void*>(kernel)] = static_cast<std::size_t>(value);
  return cudaSuccess;
}
