// Compiles the implementation header named by VC_ISA_IMPL (a quoted path) once per instruction set, each copy in
// its own namespace: cpu_generic (the compiler's baseline, SSE2 on x86-64), and on x86-64 also cpu_avx2 (AVX2,
// FMA, F16C) and cpu_avx512 (AVX-512 F/BW/DQ/VL on top). The header sees VC_VEC_BYTES, the width of a SIMD
// register in bytes (16, 32, 64), and picks its tile shapes from it. Include this inside the kernel's own
// namespace; pick the variant at run time with VC_WITH_ISA (common/cpu_isa.h). No include guard: one inclusion
// per kernel file, each with its own VC_ISA_IMPL.
#include "common/cpu_isa.h"

#ifndef VC_ISA_IMPL
#error "define VC_ISA_IMPL as the implementation header to compile per instruction set"
#endif

namespace cpu_generic {
#define VC_VEC_BYTES 16
#include VC_ISA_IMPL
#undef VC_VEC_BYTES
}  // namespace cpu_generic

#ifdef VC_CPU_ISA_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace cpu_avx2 {
#define VC_VEC_BYTES 32
#include VC_ISA_IMPL
#undef VC_VEC_BYTES
}  // namespace cpu_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace cpu_avx512 {
#define VC_VEC_BYTES 64
#include VC_ISA_IMPL
#undef VC_VEC_BYTES
}  // namespace cpu_avx512
#pragma GCC pop_options
#endif

#undef VC_ISA_IMPL
