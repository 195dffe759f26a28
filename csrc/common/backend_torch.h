// The backend policies the ATen bindings of every family are templated over (see common/backend.h): how a
// kernel launch is placed (device guard, stream) and what the backend's CUDA kernels, if any, may use. A binding
// runs a launcher as `B::launch(t, [&](void* stream) { run_x<B>(p, stream); })` for its inputs on t's device.
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdlib>

#include "common/backend.h"

#ifdef VARCORE_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace varcore {

struct Cpu {
  static constexpr bool kCudaKernels = false;

  template <class Fn>
  static void launch(const at::Tensor&, Fn&& fn) {
    fn(nullptr);
  }
};

#ifdef VARCORE_WITH_CUDA
struct Cuda {
  static constexpr bool kCudaKernels = true;

  // On the current stream of t's device (matters under CUDA graphs and torch.compile).
  template <class Fn>
  static void launch(const at::Tensor& t, Fn&& fn) {
    const c10::cuda::CUDAGuard guard(t.device());
    fn(at::cuda::getCurrentCUDAStream(t.device().index()).stream());
  }

  // Dynamic shared memory a block may opt in to on t's device.
  static std::size_t smem_limit(const at::Tensor& t) {
    return at::cuda::getDeviceProperties(t.device().index())->sharedMemPerBlockOptin;
  }
};
#endif

// Every emulated launch runs to completion on the calling thread; streams do not exist there.
struct Simt {
  static constexpr bool kCudaKernels = true;

  template <class Fn>
  static void launch(const at::Tensor&, Fn&& fn) {
    fn(nullptr);
  }

  // VARCORE_SIMT_SMEM_KB (default 64, what an sm_75 block may opt in to), so tests can run both the small tiles
  // and the large ones of GPUs with more shared memory.
  static std::size_t smem_limit(const at::Tensor&) {
    const char* env = std::getenv("VARCORE_SIMT_SMEM_KB");
    const std::size_t kb = env && *env ? std::strtoul(env, nullptr, 10) : 64;
    return kb * 1024;
  }
};

}  // namespace varcore
