// CPU kernels of block-causal attention: the code of attention_cpu_impl.h compiled for AVX-512, AVX2+FMA and the
// baseline x86-64 (or the host's default elsewhere), picked at run time by what the CPU supports and capped by
// VARCORE_CPU_ISA (common/cpu_isa.h). Work is split with at::parallel_for: forward over (batch, head, run of
// query tiles), backward over (batch, head).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/attention.h"
#include "common/cpu_isa.h"

namespace varcore::attention {

#define VC_ISA_IMPL "attention/attention_cpu_impl.h"
#include "common/cpu_isa_variants.h"

namespace {

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

template <>
void run_forward<Cpu>(const ForwardParams& p, void*) {
  const cpu::Isa isa = cpu::pick_isa();
  dispatch(p, [&](auto tag) {
    using T = decltype(tag);
    VC_WITH_ISA(isa, isa_ns::forward<T>(p));
  });
}

template <>
void run_backward<Cpu>(const BackwardParams& p, void*) {
  const cpu::Isa isa = cpu::pick_isa();
  dispatch(p, [&](auto tag) {
    using T = decltype(tag);
    VC_WITH_ISA(isa, isa_ns::backward<T>(p));
  });
}

}  // namespace varcore::attention
