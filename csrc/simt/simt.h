// Host emulation of the CUDA execution model: with VARCORE_SIMT defined, the CUDA kernels of csrc/ compile as
// plain C++ and run on the CPU (see README.md). Kernels include it through csrc/common/cuda_compat.h.
#pragma once

#ifndef VARCORE_SIMT
#error "simt.h is the host emulation of CUDA: define VARCORE_SIMT and include csrc/common/cuda_compat.h"
#endif

#include "simt_device.h"
#include "simt_half.h"
#include "simt_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __launch_bounds__(...)
// __restrict__ is a g++ keyword already.

// Block storage. The blocks of a launch run one after another on one host thread and the emulated threads of a
// block are fibers of that host thread, so a function's statics are exactly the block's shared memory;
// thread_local keeps concurrent launches from different host threads apart.
#define __shared__ static thread_local

// `#pragma unroll` means nothing to g++.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
