// Function qualifiers for code shared by the CPU kernels, the CUDA kernels and their host emulation.
#pragma once

#if defined(__CUDACC__)
#define VC_HD __host__ __device__ __forceinline__
#else
#define VC_HD inline
#endif
