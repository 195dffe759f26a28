// CUDA kernel for the PAR token-order copies (plain CUDA; also compiled against csrc/simt).
#pragma once

#include "common/cuda_compat.h"
#include "par_order/par_order.h"

namespace varcore::par_order {

// One thread per unit of payload, grid-stride; consecutive threads touch consecutive units of a token,
// so rows with many channels are read and written coalesced.
template <typename Unit>
__global__ void copy_kernel(CopyParams p) {
  const auto* src = static_cast<const Unit*>(p.src);
  auto* dst = static_cast<Unit*>(p.dst);
  const int64_t U = p.token_units;
  const int64_t count = p.group_count * p.M * p.M;  // tokens per batch row
  const int64_t total = p.batch * count * U;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    const int64_t u = i % U, t = i / U;
    const int64_t bi = t / count, k = t % count;
    const int64_t r = raster_index(p.group_begin * p.M * p.M + k, p.G, p.M);
    const int64_t s = p.to_raster ? k : r, d = p.to_raster ? r : k;
    dst[(bi * p.dst_batch_stride + d) * U + u] = src[(bi * p.src_batch_stride + s) * U + u];
  }
}

}  // namespace varcore::par_order
