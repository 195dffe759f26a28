// Run-time choice among the instruction-set variants of a CPU kernel. A kernel file compiles its implementation
// header once per variant by including common/cpu_isa_variants.h (which defines the namespaces cpu_generic,
// cpu_avx2 and cpu_avx512 on x86-64 with GCC-compatible compilers, only cpu_generic elsewhere) and calls into
// the variant picked here with VC_WITH_ISA. The environment variable VARCORE_CPU_ISA=avx512|avx2|generic caps
// the choice (the tests use it to run every variant).
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define VC_CPU_ISA_X86 1
#endif

namespace varcore::cpu {

enum class Isa { kGeneric, kAvx2, kAvx512 };

// The widest variant this CPU runs, capped by VARCORE_CPU_ISA.
inline Isa pick_isa() {
  Isa best = Isa::kGeneric;
#ifdef VC_CPU_ISA_X86
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    best = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    best = Isa::kAvx2;
  }
#endif
  const char* cap = std::getenv("VARCORE_CPU_ISA");
  if (cap && std::strcmp(cap, "generic") == 0) return Isa::kGeneric;
  if (cap && std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) return Isa::kAvx2;
  return best;
}

}  // namespace varcore::cpu

// Runs the statement(s) given, in which the namespace alias isa_ns names the variant of `isa`, e.g.
//   VC_WITH_ISA(varcore::cpu::pick_isa(), return isa_ns::forward<T>(p));
#ifdef VC_CPU_ISA_X86
#define VC_WITH_ISA(isa, ...)                                               \
  do {                                                                      \
    switch (isa) {                                                          \
      case ::varcore::cpu::Isa::kAvx512: {                                  \
        namespace isa_ns = cpu_avx512;                                      \
        __VA_ARGS__;                                                        \
      } break;                                                              \
      case ::varcore::cpu::Isa::kAvx2: {                                    \
        namespace isa_ns = cpu_avx2;                                        \
        __VA_ARGS__;                                                        \
      } break;                                                              \
      default: {                                                            \
        namespace isa_ns = cpu_generic;                                     \
        __VA_ARGS__;                                                        \
      }                                                                     \
    }                                                                       \
  } while (0)
#else
#define VC_WITH_ISA(isa, ...)           \
  do {                                  \
    (void)(isa);                        \
    namespace isa_ns = cpu_generic;     \
    __VA_ARGS__;                        \
  } while (0)
#endif
