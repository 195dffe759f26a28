// What CUDA kernel sources include: the CUDA runtime under nvcc, or with VARCORE_SIMT defined its host emulation
// (csrc/simt/), so that one kernel source builds for the GPU and runs on the CPU in tests. Kernels launch through
// these macros only.
//
//   VC_LAUNCH(kernel, grid, block, smem_bytes, stream, args...)  kernel<<<grid, block, smem_bytes, stream>>>(args...)
//       kernel is a __global__ function or a variable holding one (needed for templates with several arguments:
//       `auto k = my_kernel<float, 4>; VC_LAUNCH(k, ...)`). Under simt the launch runs the grid to completion
//       and throws std::runtime_error for a bad configuration.
//   VC_CHECK_LAUNCH()                  throws std::runtime_error if the last launch failed (cudaGetLastError)
//   VC_CHECK_CUDA(call)                throws std::runtime_error naming the call if a runtime API call (such as
//                                      cudaFuncSetAttribute) fails, after clearing the error it left behind
//   VC_DYNAMIC_SHARED(T, name)         declares `T* const name` pointing at the block's dynamic shared memory
//   VC_DEVICE_CHECK(cond, msg)         inside a kernel, a check of an input's values that the host glue does not
//                                      read (reading them would synchronise the device): a device-side trap on a
//                                      GPU (reported by the next synchronisation, as torch's own index checks are),
//                                      a ValueError under the emulation (thrown by the launch on the calling thread)
//   VC_HOST_DEVICE, VC_DEVICE_INLINE   __host__ __device__, __device__ __forceinline__
#pragma once

#ifdef VARCORE_SIMT
#include <c10/util/Exception.h>

#include "../simt/simt.h"
#else
#include <cstdio>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <stdexcept>
#include <string>

#define VC_HOST_DEVICE __host__ __device__
#define VC_DEVICE_INLINE __device__ __forceinline__

#ifdef VARCORE_SIMT
#define VC_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::varcore::simt::launch(kernel, grid, block, smem_bytes, stream)(__VA_ARGS__)
#define VC_DYNAMIC_SHARED(T, name) T* const name = static_cast<T*>(::varcore::simt::dynamic_shared())
#define VC_DEVICE_CHECK(cond, msg) \
  do {                             \
    if (!(cond)) TORCH_CHECK_VALUE(false, msg); \
  } while (0)
#else
#define VC_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<grid, block, smem_bytes, stream>>>(__VA_ARGS__)
// One untyped extern array for every kernel: extern __shared__ arrays of different types (as templates over T
// would declare) conflict.
#define VC_DYNAMIC_SHARED(T, name)                                  \
  extern __shared__ __align__(16) unsigned char vc_dynamic_smem_[]; \
  T* const name = reinterpret_cast<T*>(vc_dynamic_smem_)
#define VC_DEVICE_CHECK(cond, msg)    \
  do {                                \
    if (!(cond)) {                    \
      printf("varcore: %s\n", msg);   \
      __trap();                       \
    }                                 \
  } while (0)
#endif

namespace varcore::detail {

inline void throw_if_launch_failed(cudaError_t err, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA kernel launch failed at ") + file + ":" + std::to_string(line) +
                             ": " + cudaGetErrorString(err));
  }
}

inline void throw_if_call_failed(cudaError_t err, const char* call, const char* file, int line) {
  if (err != cudaSuccess) {
    cudaGetLastError();  // a failed call also sets the last error, which the next VC_CHECK_LAUNCH would report
    throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                             cudaGetErrorString(err));
  }
}

}  // namespace varcore::detail

#define VC_CHECK_LAUNCH() ::varcore::detail::throw_if_launch_failed(cudaGetLastError(), __FILE__, __LINE__)
#define VC_CHECK_CUDA(call) ::varcore::detail::throw_if_call_failed((call), #call, __FILE__, __LINE__)
