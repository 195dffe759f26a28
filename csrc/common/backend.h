// The backends an op runs on: Cpu (the CPU kernels), Cuda (the CUDA kernels built by nvcc) and Simt (the same
// CUDA sources built against the host emulation, csrc/simt). A family declares each kernel launcher once as a
// template over the backend, `template <class Backend> void run_x(const XParams& p, void* stream)`, and defines
// run_x<Cpu> in <family>_cpu.cpp and run_x<VC_CUDA_BACKEND> in <family>_cuda.cu. Here the backends are only
// named (no ATen, so nvcc sees this too); common/backend_torch.h defines them as the policies the ATen bindings
// are templated over.
#pragma once

namespace varcore {

struct Cpu;
struct Cuda;
struct Simt;

}  // namespace varcore

// The backend one build of a .cu source launches for: Cuda under nvcc, Simt against the host emulation.
#if defined(VARCORE_SIMT)
#define VC_CUDA_BACKEND ::varcore::Simt
#else
#define VC_CUDA_BACKEND ::varcore::Cuda
#endif
