// CPU few-row linear layer: packing, and the kernel of linear_cpu_impl.h compiled for AVX-512, AVX2+FMA and the
// baseline ISA, picked at run time (VARCORE_CPU_ISA=avx512|avx2|generic caps the choice, for the tests);
// parallel over column panels.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "linear/linear.h"

namespace varcore::linear {
namespace {

namespace generic {
#define VC_VEC_BYTES 16
#include "linear/linear_cpu_impl.h"
#undef VC_VEC_BYTES
}  // namespace generic

#if defined(__x86_64__) && defined(__GNUC__)
#define VC_LINEAR_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#define VC_VEC_BYTES 32
#include "linear/linear_cpu_impl.h"
#undef VC_VEC_BYTES
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
namespace avx512 {
#define VC_VEC_BYTES 64
#include "linear/linear_cpu_impl.h"
#undef VC_VEC_BYTES
}  // namespace avx512
#pragma GCC pop_options
#endif

using PanelsFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, int64_t, int64_t, float*, int64_t);

PanelsFn pick_kernel() {
  const char* cap = std::getenv("VARCORE_CPU_ISA");
  const bool generic_only = cap && std::strcmp(cap, "generic") == 0;
  const bool no_avx512 = generic_only || (cap && std::strcmp(cap, "avx2") == 0);
#ifdef VC_LINEAR_X86
  if (!no_avx512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return avx512::panels;
  if (!generic_only && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return avx2::panels;
#endif
  (void)no_avx512;
  return generic::panels;
}

}  // namespace

void pack_cpu(const float* w, int64_t N, int64_t K, float* packed) {
  const int64_t n_panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      float* dst = packed + p * K * kPanel;
      std::memset(dst, 0, sizeof(float) * K * kPanel);
      for (int64_t j = 0; j < kPanel && p * kPanel + j < N; ++j) {
        const float* row = w + (p * kPanel + j) * K;
        for (int64_t k = 0; k < K; ++k) dst[k * kPanel + j] = row[k];
      }
    }
  });
}

void forward_cpu(const float* x, int64_t R, int64_t K, const float* packed, int64_t n_panels, float* y,
                 int64_t ldy) {
  const PanelsFn kernel = pick_kernel();
  // A panel is K * kPanel * 4 bytes (192 KiB for K = 768): one per task is plenty of work.
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) { kernel(x, R, K, packed, p0, p1, n_panels, y, ldy); });
}

}  // namespace varcore::linear
