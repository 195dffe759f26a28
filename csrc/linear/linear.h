// Few-row float32 linear layer for cached decoding (PARSampler's fast mode): y (R, N) = x (R, K) @ W^T for R of
// about 1-64 rows, with W (N, K) packed once into column panels. Schemas: linear_schema.h.
#pragma once

#include <cstdint>

namespace varcore::linear {

// Columns per packed panel, the same for every instruction set so a packed weight runs on any of them.
constexpr int64_t kPanel = 64;

// W (N, K) row-major -> panels (ceil(N / kPanel), K, kPanel): panel p row k holds W[p*kPanel + j][k] for
// j < kPanel, zero past N.
void pack_cpu(const float* w, int64_t N, int64_t K, float* packed);

// y (R, ldy) row-major, columns [0, ceil(N / kPanel) * kPanel) written (ldy >= that width) from x (R, K)
// row-major and the packed weight.
void forward_cpu(const float* x, int64_t R, int64_t K, const float* packed, int64_t panels, float* y, int64_t ldy);

// xn (R, K) = x * rsqrt(mean(x^2 over K) + eps) * g, row by row, in float32 (accumulated in double).
void rmsnorm_cpu(const float* x, int64_t R, int64_t K, const float* g, double eps, float* xn);

}  // namespace varcore::linear
