// CPU few-row linear layer: packing, and the kernel of linear_cpu_impl.h compiled once per instruction set
// (common/cpu_isa_variants.h) and picked at run time (common/cpu_isa.h; VARCORE_CPU_ISA caps the choice, for the
// tests); parallel over column panels.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/cpu_isa.h"
#include "linear/linear.h"

namespace varcore::linear {
namespace {

#define VC_ISA_IMPL "linear/linear_cpu_impl.h"
#include "common/cpu_isa_variants.h"

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
  const cpu::Isa isa = cpu::pick_isa();
  // A panel is K * kPanel * 4 bytes (192 KiB for K = 768): one per task is plenty of work.
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    VC_WITH_ISA(isa, isa_ns::panels(x, R, K, packed, p0, p1, n_panels, y, ldy));
  });
}

void rmsnorm_cpu(const float* x, int64_t R, int64_t K, const float* g, double eps, float* xn) {
  for (int64_t r = 0; r < R; ++r) {  // a few rows of a few thousand features: not worth threads
    const float* xr = x + r * K;
    double sum = 0.0;
    for (int64_t k = 0; k < K; ++k) sum += double(xr[k]) * xr[k];
    const float scale = float(1.0 / std::sqrt(sum / double(K) + eps));
    for (int64_t k = 0; k < K; ++k) xn[r * K + k] = xr[k] * scale * g[k];
  }
}

}  // namespace varcore::linear
