// Function qualifiers for code shared by the CPU kernels, the CUDA kernels and their host emulation.
#pragma once

#if defined(__CUDACC__)
#define VC_HD __host__ __device__ __forceinline__
#else
#define VC_HD inline
#endif

// A CUDA launcher's name in each build of the same .cu source: copy_cuda (nvcc) or copy_simt (host emulation).
#if defined(VARCORE_SIMT)
#define VC_CUDA_FN(name) name##_simt
#else
#define VC_CUDA_FN(name) name##_cuda
#endif
