// CPU kernels of block-causal attention: the code of attention_cpu_impl.h compiled for AVX-512, AVX2+FMA and the
// baseline x86-64 (or the host's default elsewhere), picked at run time by what the CPU supports. The
// environment variable VARCORE_CPU_ISA=avx512|avx2|generic caps the choice (tests use it to run every variant).
// Work is split with at::parallel_for: forward over (batch, head, query tile), backward over (batch, head).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "attention/attention.h"

namespace varcore::attention {

namespace cpu_generic {
#define VC_VEC_BYTES 16
#define VC_MR 4
#include "attention/attention_cpu_impl.h"
#undef VC_VEC_BYTES
#undef VC_MR
}  // namespace cpu_generic

#if defined(__x86_64__) && defined(__GNUC__)
#define VC_HAVE_X86_VARIANTS 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace cpu_avx2 {
#define VC_VEC_BYTES 32
#define VC_MR 4
#include "attention/attention_cpu_impl.h"
#undef VC_VEC_BYTES
#undef VC_MR
}  // namespace cpu_avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")
namespace cpu_avx512 {
#define VC_VEC_BYTES 64
#define VC_MR 12
#include "attention/attention_cpu_impl.h"
#undef VC_VEC_BYTES
#undef VC_MR
}  // namespace cpu_avx512
#pragma GCC pop_options
#endif

namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa pick_isa() {
  Isa best = Isa::kGeneric;
#ifdef VC_HAVE_X86_VARIANTS
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    best = Isa::kAvx512;
  } else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    best = Isa::kAvx2;
  }
#endif
  const char* env = std::getenv("VARCORE_CPU_ISA");
  const std::string cap = env ? env : "";
  if (cap == "generic") return Isa::kGeneric;
  if (cap == "avx2" && best == Isa::kAvx512) return Isa::kAvx2;
  return best;
}

template <class Params, class Fn>
void dispatch(const Params& p, Fn&& fn) {
  switch (p.dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat16: fn(c10::Half{}); break;
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
    case DType::kFloat64: fn(double{}); break;
  }
}

}  // namespace

void forward_cpu(const ForwardParams& p) {
  const Isa isa = pick_isa();
  dispatch(p, [&](auto tag) {
    using T = decltype(tag);
#ifdef VC_HAVE_X86_VARIANTS
    if (isa == Isa::kAvx512) return cpu_avx512::forward<T>(p);
    if (isa == Isa::kAvx2) return cpu_avx2::forward<T>(p);
#endif
    cpu_generic::forward<T>(p);
  });
}

void backward_cpu(const BackwardParams& p) {
  const Isa isa = pick_isa();
  dispatch(p, [&](auto tag) {
    using T = decltype(tag);
#ifdef VC_HAVE_X86_VARIANTS
    if (isa == Isa::kAvx512) return cpu_avx512::backward<T>(p);
    if (isa == Isa::kAvx2) return cpu_avx2::backward<T>(p);
#endif
    cpu_generic::backward<T>(p);
  });
}

}  // namespace varcore::attention
